"""The API's request schemas and the model library's configs describe the same settings with the same defaults;
the enumerations the library and the service both spell agree."""

from dataclasses import MISSING, fields

from app.schemas.jobs import Hyperparameters, JobCreate, LoRASpec, ModelSpec
from core.enums import CheckpointTask
from model import GPTConfig, LoRAConfig, TrainConfig
from model.checkpoint import TASKS
from model.config import PRESETS
from model.dpo import LEARNING_RATE as DPO_LEARNING_RATE

# what the library has that a job request does not set: the worker picks the device; Adam's betas stay the
# library's; a model's vocabulary comes from its tokenizer and its biases and epsilon from its preset
# (rope_scaling stretches an imported model's context: nothing trained here from scratch asks for it)
LIBRARY_ONLY = {TrainConfig: {"device", "beta1", "beta2"},
                GPTConfig: {"vocab_size", "bias", "layer_norm_eps", "rope_scaling"}, LoRAConfig: set()}
# what a request has that the library config does not: the training data's shape
REQUEST_ONLY = {Hyperparameters: {"batch_size", "block_size", "stride", "max_length", "epochs"}, ModelSpec: {"preset"},
                LoRASpec: set()}


def _defaults(config) -> dict:
    return {f.name: f.default for f in fields(config) if f.default is not MISSING}


def test_hyperparameters_are_the_train_config():
    config_fields = {f.name for f in fields(TrainConfig)} - LIBRARY_ONLY[TrainConfig]
    assert set(Hyperparameters.model_fields) - REQUEST_ONLY[Hyperparameters] == config_fields
    request_defaults = Hyperparameters().model_dump()
    assert {name: request_defaults[name] for name in config_fields} == {
        name: value for name, value in _defaults(TrainConfig).items() if name in config_fields}
    assert TrainConfig.from_values(request_defaults, device="cpu") == TrainConfig(device="cpu")


def test_lora_spec_is_the_lora_config():
    assert set(LoRASpec.model_fields) == {f.name for f in fields(LoRAConfig)}
    assert LoRAConfig(**LoRASpec().model_dump()) == LoRAConfig()


def test_model_spec_overrides_gpt_config_fields():
    assert set(ModelSpec.model_fields) - REQUEST_ONLY[ModelSpec] == {f.name for f in fields(GPTConfig)} - \
        LIBRARY_ONLY[GPTConfig]
    assert ModelSpec().preset in PRESETS
    assert GPTConfig.preset(ModelSpec().preset, **ModelSpec().overrides()) == GPTConfig.preset(ModelSpec().preset)


def test_checkpoint_tasks_are_the_library_s():
    assert tuple(CheckpointTask) == TASKS


def test_a_dpo_job_defaults_to_dpos_learning_rate():
    def learning_rate(type_: str, **hyperparameters) -> float:
        return JobCreate(type=type_, corpus_id="corpus_x", base_checkpoint_id="ckpt_x",
                         hyperparameters=hyperparameters).hyperparameters.learning_rate

    assert learning_rate("finetune_dpo") == DPO_LEARNING_RATE < TrainConfig.learning_rate
    assert learning_rate("finetune_dpo", learning_rate=0.003) == 0.003  # as asked
    assert learning_rate("finetune_instruct") == TrainConfig.learning_rate
