"""podformer's models: the shared block library and one module per family."""

from podformer.model import bert, gpt, t5

# family name -> (config dataclass, module). The name is what run configs put in model.family.
FAMILIES = {
    "gpt": (gpt.GPTConfig, gpt.GPT),
    "bert": (bert.BertConfig, bert.Bert),
    "roberta": (bert.RobertaConfig, bert.Bert),
    "distilbert": (bert.DistilBertConfig, bert.Bert),
    "t5": (t5.T5Config, t5.T5),
    "bart": (t5.BartConfig, t5.T5),
}
