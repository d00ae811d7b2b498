"""Config validation: defaults, normalisation, and one clear error per bad key."""

import copy

import pytest
import yaml
from helpers import ROOT
from wsiattack import config as wsiconfig
from wsiattack.errors import ConfigError


@pytest.fixture
def shipped():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_shipped_config_validates_and_fills_defaults(shipped):
    checked = wsiconfig.validate_config(shipped)
    assert checked["attacks"]["pgd_eps4"]["eps"] == pytest.approx(4 / 255)
    assert checked["attacks"]["pgd_eps4"]["step_size"] == pytest.approx(1 / 255)
    assert checked["tiling"]["mpp_tolerance"] == 0.05  # default filled in
    assert checked["tiling"]["tissue"]["min_object_um2"] == 20000.0
    assert shipped["attacks"]["pgd_eps4"]["eps"] == "4/255"  # the input is not modified


# Test configs given after config.yaml on the command line (the factor grid, the heads study).
# overlay file -> the config it is given after (Snakemake merges --configfile files key by key)
OVERLAYS = {
    "factor_grid.yaml": "config.yaml",
    "heads_study.yaml": "config.yaml",
    "positive_control_dose.yaml": "config.yaml",
    "positive_control_tiny.yaml": "tests/configs/tiny.yaml",
    "defences_tiny.yaml": "tests/configs/tiny.yaml",
    "stain_study.yaml": "config.yaml",
    "transfer_study.yaml": "config.yaml",
    "universal_study.yaml": "config.yaml",
    "snap_study.yaml": "config.yaml",
    "backdoor_study.yaml": "config.yaml",
    "defence_study.yaml": "config.yaml",
    "defence_redflag.yaml": "config.yaml",
}


def overlaid_on_default(overlay: dict, *, base: str = "config.yaml") -> dict:
    """``base`` with ``overlay`` merged onto it key by key, as Snakemake merges --configfile."""
    from snakemake.utils import update_config

    config = yaml.safe_load((ROOT / base).read_text())
    update_config(config, overlay)
    return config


def test_test_configs_validate():
    paths = sorted((ROOT / "tests" / "configs").glob("*.yaml"))
    assert {p.name for p in paths} >= {"tiny.yaml", *OVERLAYS}
    for path in paths:
        config = yaml.safe_load(path.read_text())
        base = OVERLAYS.get(path.name)
        wsiconfig.validate_config(overlaid_on_default(config, base=base) if base else config)


def test_factor_grid_overlays_the_default_with_48_attacks():
    """Given after config.yaml (make grid), Snakemake merges it key by key onto the default."""
    config = overlaid_on_default(yaml.safe_load((ROOT / "tests" / "configs" / "factor_grid.yaml").read_text()))
    attacks = wsiconfig.validate_config(config)["attacks"]
    assert len(attacks) == 6 + 6 * 4 * 2 and {"pgd_eps4", "noise_eps4", "null_control", "cw_eps8_f0.01_random"} <= set(
        attacks
    )
    assert (
        attacks["pgd_eps1_f0.001_random"]["steps"] == 5 and attacks["cw_eps1_f0.001_random"]["binary_search_steps"] == 2
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(colour="blue"), r"config: <top level>: .*'colour' was unexpected"),
        (lambda c: c["attacks"]["pgd_eps4"].update(epz=1), r"config: attacks\.pgd_eps4: .*'epz' was unexpected"),
        (
            lambda c: c["attacks"]["pgd_eps4"].update(eps=0),
            r"config: attacks\.pgd_eps4\.eps: 0 is only meaningful for the noise method",
        ),
        (
            lambda c: c["tiling"]["tissue"].update(min_fraction=2),
            r"config: tiling\.tissue\.min_fraction: 2 is greater than the maximum",
        ),
        (lambda c: c["attacks"]["pgd_eps4"].update(eps="4/0"), r"config: attacks\.pgd_eps4\.eps: division by zero"),
        (
            lambda c: c["attacks"]["pgd_eps4"].update(eps="300/255"),
            r"attacks\.pgd_eps4\.eps: 1\.17\d* is outside \[0, 1\]",
        ),
        (lambda c: c["attacks"]["pgd_eps4"].update(eps="four"), r"attacks\.pgd_eps4\.eps: 'four' is neither a number"),
        (lambda c: c.update(encoders=["uni_typo"]), r"config: encoders: unknown encoder 'uni_typo' \(known: demo"),
        (
            lambda c: c["attacks"]["pgd_eps4"].update(method="deepfool"),
            r"attacks\.pgd_eps4\.method: 'deepfool' is not one of",
        ),
        (lambda c: c.pop("classes"), r"'classes' is a required property"),
        (
            lambda c: c["attacks"].update({"bad/name": c["attacks"]["pgd_eps4"]}),
            r"config: attacks: 'bad/name' does not match",
        ),
        (lambda c: c["mil"].update(models=["abmil", "gnn"]), r"config: mil\.models\.1: 'gnn' is not one of"),
        (
            lambda c: c["mil"].update(hparams={"mean": {"attention_dim": 8}}),
            r"mil\.hparams\.mean: .*'attention_dim' was unexpected\) \(allowed: dropout, hidden_dim\)",
        ),
        (
            lambda c: c["mil"].update(val_fraction=0.5),
            r"config: mil\.val_fraction: 0\.5 is greater than or equal to the maximum",
        ),
    ],
)
def test_bad_config_names_the_key(shipped, edit, message):
    bad = copy.deepcopy(shipped)
    edit(bad)
    with pytest.raises(ConfigError, match=message):
        wsiconfig.validate_config(bad)


def test_mil_hparams_in_the_schema_are_the_constructor_arguments():
    import inspect

    from wsiattack.mil import MIL_MODELS

    schema = wsiconfig.load_schema()
    by_model = schema["properties"]["mil"]["properties"]["hparams"]["properties"]
    assert set(by_model) == set(MIL_MODELS) == set(schema["properties"]["mil"]["properties"]["models"]["items"]["enum"])
    for name, model_class in MIL_MODELS.items():
        definition = schema["$defs"]["mil_hparams"][by_model[name]["$ref"].rsplit("/", 1)[1]]
        arguments = set(inspect.signature(model_class).parameters) - {"in_dim", "n_classes"}
        assert set(definition["properties"]) == arguments, name


def test_a_mil_model_spec_holds_its_own_hparams_only(shipped):
    edited = copy.deepcopy(shipped)
    edited["mil"]["models"] = ["abmil", "transmil"]
    edited["mil"]["hparams"] = {"transmil": {"heads": 2}}
    config = wsiconfig.validate_config(edited)
    assert wsiconfig.mil_spec(config, "transmil")["hparams"] == {"heads": 2}
    assert wsiconfig.mil_spec(config, "abmil") == {**wsiconfig.mil_spec(wsiconfig.validate_config(shipped), "abmil")}


def test_equivalent_values_give_the_same_spec(shipped):
    """Writing eps as a fraction or as a float must not re-run anything."""
    as_float = copy.deepcopy(shipped)
    as_float["attacks"]["pgd_eps4"]["eps"] = 4 / 255
    a = wsiconfig.attack_spec(wsiconfig.validate_config(shipped), "pgd_eps4")
    b = wsiconfig.attack_spec(wsiconfig.validate_config(as_float), "pgd_eps4")
    assert wsiconfig.spec_json(a) == wsiconfig.spec_json(b)


def test_attack_specs_are_independent(shipped):
    """Editing one attack leaves the other attack's spec (and so its jobs) unchanged."""
    edited = copy.deepcopy(shipped)
    edited["attacks"]["pgd_eps4"]["eps"] = "8/255"
    before, after = wsiconfig.validate_config(shipped), wsiconfig.validate_config(edited)
    assert wsiconfig.attack_spec(before, "pgd_eps4") != wsiconfig.attack_spec(after, "pgd_eps4")
    assert wsiconfig.attack_spec(before, "noise_eps4") == wsiconfig.attack_spec(after, "noise_eps4")
    assert wsiconfig.spec_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


def test_gated_encoder_without_token_or_checkpoint_fails_before_any_job(shipped, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")
    config = copy.deepcopy(shipped)
    config["encoders"] = ["demo", "uni"]
    with pytest.raises(ConfigError, match=r"config: encoders: .*uni.*HF_TOKEN"):
        wsiconfig.validate_config(config)
    config["encoder_weights"] = {"uni": "/nonexistent/uni.safetensors"}
    with pytest.raises(ConfigError, match=r"checkpoint /nonexistent/uni\.safetensors does not exist"):
        wsiconfig.validate_config(config)


def test_encoder_specs_carry_checkpoint_and_custom_entries(shipped, tmp_path, monkeypatch):
    (tmp_path / "my_encoders.py").write_text("def build():\n    raise NotImplementedError\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = tmp_path / "uni.safetensors"
    checkpoint.write_bytes(b"")
    config = copy.deepcopy(shipped)
    config["encoders"] = ["uni", "mine"]
    config["encoder_weights"] = {"uni": str(checkpoint)}
    config["custom_encoders"] = {
        "mine": {"factory": "my_encoders:build", "input_px": 224, "embed_dim": 64, "readout": "output"}
    }
    checked = wsiconfig.validate_config(config)
    assert wsiconfig.encoder_spec(checked, "uni") == {"name": "uni", "checkpoint": str(checkpoint), "custom": None}
    assert wsiconfig.encoder_spec(checked, "mine")["custom"]["factory"] == "my_encoders:build"
    # n_params only sizes the jobs' memory: giving it leaves the rules' specs (and outputs) alone
    sized = copy.deepcopy(config)
    sized["custom_encoders"]["mine"]["n_params"] = 86_000_000
    assert wsiconfig.encoder_spec(wsiconfig.validate_config(sized), "mine") == wsiconfig.encoder_spec(checked, "mine")
    config["encoder_weights"] = {"uni": str(checkpoint), "virchow2": str(checkpoint)}
    with pytest.raises(ConfigError, match=r"encoder_weights: 'virchow2' is not listed under encoders"):
        wsiconfig.validate_config(config)


# --- gray-box attacks: a MIL head ranks the tiles or scores the bag -------------------------------

PGD = {"method": "pgd", "eps": "4/255"}


def with_attack(shipped, **entry):
    config = copy.deepcopy(shipped)
    config["mil"] = {**config["mil"], "models": ["abmil"]}
    config["attacks"]["gray"] = {**PGD, **entry}
    return config


def test_attention_selection_names_a_mil_model_defaulting_to_the_first(shipped):
    checked = wsiconfig.validate_config(with_attack(shipped, selection="attention"))
    assert checked["attacks"]["gray"]["mil"] == "abmil" and checked["attacks"]["gray"]["objective"] == "cosine"
    explicit = wsiconfig.validate_config(with_attack(shipped, selection="attention", mil="abmil"))
    assert wsiconfig.attack_spec(explicit, "gray") == wsiconfig.attack_spec(checked, "gray")  # same spec, no re-run
    assert "mil" not in checked["attacks"]["pgd_eps4"]  # label-free entries carry no head


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"selection": "attention", "mil": "transmil"},
            r"config: attacks\.gray\.mil: 'transmil' is not one of mil\.models \(abmil\)",
        ),
        (
            {"selection": "random", "mil": "abmil"},
            r"config: attacks\.gray\.mil: only attacks with selection 'attention' or objective 'mil_cross_entropy'",
        ),
        (
            {"objective": "mil_cross_entropy", "selection": "vulnerability"},
            r"config: attacks\.gray\.selection: the vulnerability probe .* cannot use objective 'mil_cross_entropy'",
        ),
        ({"objective": "cross_entropy"}, r"config: attacks\.gray\.objective: 'cross_entropy' is not one of"),
    ],
)
def test_bad_gray_box_entries_name_the_key(shipped, entry, message):
    with pytest.raises(ConfigError, match=message):
        wsiconfig.validate_config(with_attack(shipped, **entry))


def test_the_oracle_objective_is_used_only_when_asked_for(shipped):
    checked = wsiconfig.validate_config(shipped)
    # The default attacks stay label-free; only the positive control uses the gray-box oracle.
    objectives = {name: entry["objective"] for name, entry in checked["attacks"].items()}
    assert {name for name, objective in objectives.items() if objective != "cosine"} == {
        "positive_control",
        "positive_control_eps16",
    }
    oracle = wsiconfig.validate_config(with_attack(shipped, objective="mil_cross_entropy"))["attacks"]["gray"]
    assert oracle["objective"] == "mil_cross_entropy" and oracle["mil"] == "abmil"


def test_sweep_entries_are_checked_against_the_attack_schema(shipped):
    config = copy.deepcopy(shipped)
    config["sweep"] = {"methods": ["pgd"], "eps": ["4/255"], "selections": ["attention"], "base": {"mil": "transmil"}}
    with pytest.raises(
        ConfigError, match=r"config: sweep \(pgd_eps4_f0\.001_attention\)\.mil: 'transmil' is not one of mil\.models"
    ):
        wsiconfig.validate_config(config)
    config["sweep"]["base"] = {"restarts": 0}
    with pytest.raises(
        ConfigError, match=r"config: sweep \(pgd_eps4_f0\.001_attention\)\.restarts: 0 is less than the minimum of 1"
    ):
        wsiconfig.validate_config(config)
