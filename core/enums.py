"""The enumerations the service stores and speaks, each defined once; the API's schemas derive from them."""

from enum import StrEnum


class CorpusKind(StrEnum):
    TEXT = "text"
    CLASSIFICATION = "classification"
    INSTRUCTION = "instruction"
    PREFERENCE = "preference"  # prompts with a chosen and a rejected response (DPO)


class CheckpointTask(StrEnum):
    """What a checkpoint's model predicts (model.checkpoint.TASKS spells the same in the library)."""

    LM = "lm"
    CLASSIFIER = "classifier"


class CheckpointSource(StrEnum):
    TRAINING = "training"
    IMPORT = "import"


class EvaluationKind(StrEnum):
    LM = "lm"  # a language model on text
    CLASSIFIER = "classifier"  # a classifier on labelled texts
    INSTRUCT = "instruct"  # an instruction model on instructions
    PREFERENCE = "preference"  # a language model on preference pairs: does it rank chosen above rejected


class ServingDtype(StrEnum):
    """The dtype a deployment is served in; auto: bfloat16 on a device that supports it, else float32."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class KeyScope(StrEnum):
    """API key scopes, each allowing what the ones before it allow (docs/DEPLOY.md, "Security")."""

    READ = "read"  # read everything but keys; generate and classify
    TRAIN = "train"  # upload corpora, import checkpoints, start and cancel jobs and evaluations
    DEPLOY = "deploy"  # change what is served; delete corpora and checkpoints
    ADMIN = "admin"  # manage API keys

    @property
    def rank(self) -> int:
        return list(KeyScope).index(self)
