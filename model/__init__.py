"""podformer's models: the shared block library, one module per family, and the family record
(model/families.py). Importing this package loads nothing: configs import the JAX-free config modules."""
