from pathlib import Path

import pytest

from dinoalign.config import ConfigError, Params, apply_overrides, flatten, load_params, to_dict


def test_repo_params_load_and_are_typed(repo_root: Path) -> None:
    p = load_params(repo_root / "params.yaml")
    assert isinstance(p, Params)
    assert p.data.source == "synthetic"
    assert isinstance(p.data.synthetic.n_train, int)


def test_dotted_overrides_apply_with_yaml_types(repo_root: Path) -> None:
    p = load_params(
        repo_root / "params.yaml",
        ["data.synthetic.n_train=17", "backbone.model_kwargs={embed_dim: 96}", "tracking.uri=null"],
    )
    assert p.data.synthetic.n_train == 17
    assert p.backbone.model_kwargs == {"embed_dim": 96}
    assert p.tracking.uri is None


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'shard_size'"):
        load_params(tmp_path / "missing.yaml", ["prepare.shard_sise=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("prepare.shard_size=abc", "expected an integer"),
        ("prepare.shard_size=1.5", "expected an integer"),
        ("prepare.validate_images=maybe", "expected true/false"),
        ("data=3", "expected a mapping"),
        ("noequals", "must look like"),
    ],
)
def test_bad_values_are_rejected(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_params(tmp_path / "missing.yaml", [override])


def test_overrides_do_not_mutate_input_and_flatten_roundtrips() -> None:
    raw = {"a": {"b": 1}}
    out = apply_overrides(raw, ["a.c.d=2"])
    assert raw == {"a": {"b": 1}}
    assert flatten(out) == {"a.b": 1, "a.c.d": 2}


def test_resolved_params_roundtrip_through_dict(repo_root: Path) -> None:
    p = load_params(repo_root / "params.yaml")
    from dinoalign.config import from_dict

    assert from_dict(Params, to_dict(p)) == p
