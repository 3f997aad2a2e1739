"""TrainConfig: the recipes of DESIGN 2.5, validation with named fields, serialisation."""

import pytest

from dco_train.config import TrainConfig, parse_tokens
from dco_train.errors import DCOError


def test_subject_and_style_recipes():
    s = TrainConfig.subject(tokens={"<dog>": "dog"})
    assert (s.train_text_encoder_ti, s.rank, s.max_train_steps, s.learning_rate, s.text_encoder_lr) == (True, 32, 2000, 5e-5, 5e-6)
    assert (s.dco_beta, s.offset_noise, s.resolution, s.adam_weight_decay, s.max_grad_norm) == (1000.0, 0.0, 1024, 1e-4, 1.0)
    st = TrainConfig.style()
    assert (st.train_text_encoder_ti, st.rank, st.max_train_steps, st.offset_noise) == (False, 64, 1000, 0.1)
    assert st.lr_scheduler == "constant" and st.train_batch_size == 1


def test_roundtrip_through_json():
    cfg = TrainConfig.subject(config_dir="config.json", tokens={"<dog>": "dog", "<hat>": ""}, validation_prompts=["a <dog>"])
    again = TrainConfig.from_dict(__import__("json").loads(cfg.to_json()))
    assert again == cfg


@pytest.mark.parametrize("field,value,words", [
    ("rank", 0, "rank"),
    ("resolution", 100, "multiple of 8"),
    ("learning_rate", 0.0, "learning_rate"),
    ("mixed_precision", "fp8", "mixed_precision"),
    ("lr_scheduler", "warp", "lr_scheduler"),
    ("snr_gamma", -1.0, "snr_gamma"),
    ("preset", "portrait", "preset"),
    ("tokens", {"<my dog>": "dog"}, "without spaces"),
])
def test_bad_values_name_the_field(field, value, words):
    with pytest.raises(DCOError, match=words):
        TrainConfig(**{field: value})


def test_ti_without_tokens_is_refused():
    with pytest.raises(DCOError, match="no new tokens"):
        TrainConfig(train_text_encoder_ti=True)


def test_unknown_setting_is_refused():
    with pytest.raises(DCOError, match="Unknown training settings: colour"):
        TrainConfig.from_dict({"colour": 1})


def test_parse_tokens():
    assert parse_tokens("<dog>=dog, <hat>=red hat") == {"<dog>": "dog", "<hat>": "red hat"}
    assert parse_tokens("<x>") == {"<x>": ""}
    with pytest.raises(DCOError, match="twice"):
        parse_tokens("<a>=b,<a>=c")
    with pytest.raises(DCOError, match="Cannot read"):
        parse_tokens("=dog")
