"""podformer's models: the shared block library and one module per family."""

from model import gpt

# family name -> (config dataclass, module). Other families register here as they land.
FAMILIES = {
    "gpt": (gpt.GPTConfig, gpt.GPT),
}
