import re
from pathlib import Path

import pytest

from dinoalign.config import MOVED_KEYS, ConfigError, Params, apply_overrides, flatten, load_params, to_dict


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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.source=pair", "unknown data source 'pair'. Did you mean 'pairs'?"),
        ("embed.engine=rayy", "embed.engine='rayy' (did you mean 'ray'?)"),
        ("embed.batch_size=-1", "embed.batch_size must be >= 1, got -1"),
        ("embed.batch_size=0", "embed.batch_size must be >= 1, got 0"),
        ("embed.num_actors=0", "embed.num_actors must be >= 1, got 0"),
        ("embed.shard_rows=0", "embed.shard_rows must be >= 1, got 0"),
        ("embed.actor_num_cpus=0", "embed.actor_num_cpus must be > 0"),
        ("prepare.shard_size=0", "prepare.shard_size must be >= 1, got 0"),
        ("data.max_pixels=0", "data.max_pixels must be >= 1, got 0"),
        ("data.min_side=-5", "data.min_side must be >= 1, got -5"),
        ("embed.img_size=100", "embed.img_size=100 is not a multiple of the patch size 14"),
        ("embed.text_encoders=[{key:", "the value is not valid YAML"),
    ],
)
def test_params_that_would_fail_minutes_later_are_refused_at_load(
    repo_root: Path, override: str, message: str, capsys
) -> None:
    """`dinoalign params` already refuses values that used to pass and then crash or hang
    a stage (issue #19): exit 2, one line, no traceback."""
    from dinoalign.cli import main

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_params(repo_root / "params.yaml", [override])
    assert main(["params", "-p", str(repo_root / "params.yaml"), override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_config_engine_names_are_the_embed_engines() -> None:
    from dinoalign.config import EMBED_ENGINES
    from dinoalign.embed.engine import ENGINES

    assert set(EMBED_ENGINES) == set(ENGINES)


# ----------------------------------------------------------------------------- paths


@pytest.mark.parametrize("old", sorted(MOVED_KEYS))
def test_a_moved_key_is_an_error_naming_its_new_place(tmp_path: Path, old: str) -> None:
    """The migration of the README (Params migration): every key that moved into
    ``paths:`` (or went away) fails at load with one line that names what to set, in the
    file and as an override alike."""
    section, key = old.split(".")
    (tmp_path / "params.yaml").write_text(f"{section}:\n  {key}: somewhere\n")
    for args in ((tmp_path / "params.yaml", []), (tmp_path / "none.yaml", [f"{old}=somewhere"])):
        with pytest.raises(ConfigError, match=re.escape(f"{old} has moved: set {MOVED_KEYS[old]} instead")):
            load_params(*args)


def test_every_location_is_named_once_under_paths(repo_root: Path) -> None:
    """No section but ``paths`` holds a field that names a folder or file the pipeline
    writes (the keys that moved are gone from their sections), and the repo params set
    each location once."""
    params = load_params(repo_root / "params.yaml")
    flat = flatten(to_dict(params))
    # inputs a data source or dataset reads are that source's own choice, not pipeline locations
    inputs = {"data.coco.image_dir"}
    outside = sorted(k for k in flat if not k.startswith("paths.") and k not in inputs
                     and re.search(r"(_dir|(?<!drop)_path|_file)$", k))
    assert outside == [], outside
    for old in MOVED_KEYS:
        assert old not in flat
    raw = (repo_root / "params.yaml").read_text()
    for value in ("artifacts/pairs", "artifacts/features", "artifacts/curated", "artifacts/teacher/model"):
        assert len(re.findall(rf"(?<![\w/]){re.escape(value)}\b", raw)) <= 1, value


def test_the_clip_is_named_once_and_text_encoders_of_kind_clip_take_it() -> None:
    params = load_params("/nonexistent.yaml", ["clip.name=ViT-B-16", "clip.pretrained=openai",
                                              "embed.text_encoders=[{key: clip, kind: clip}]"])
    (encoder,) = params.embed.text_encoders
    assert (encoder.kind, encoder.name, encoder.pretrained) == ("open_clip", "ViT-B-16", "openai")
    assert load_params("/nonexistent.yaml").embed.text_encoders[0].name == load_params("/nonexistent.yaml").clip.name
    with pytest.raises(ConfigError, match="kind clip takes the clip section's model"):
        load_params("/nonexistent.yaml", ["embed.text_encoders=[{key: clip, kind: clip, name: ViT-L-14}]"])
    with pytest.raises(ConfigError, match="kind open_clip needs a name"):
        load_params("/nonexistent.yaml", ["embed.text_encoders=[{key: c2, kind: open_clip}]"])
