"""Declarative group files (TOML/JSON) and applying them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloudmon.autoscale.apply import ApplyError, apply_specs, load_file
from cloudmon.autoscale.model import GroupSpec, StepScalingPolicy, TargetTrackingPolicy

TOML = """
[[group]]
name = "web"
min_size = 1
max_size = 8
desired = 2
termination_policy = "most_loaded_host"

[group.template]
provider = "libvirt"
image = "/var/lib/cloudmon/base.qcow2"
vcpus = 2
memory_mib = 1024
hosts = ["h1", "h2"]
params = { network = "default" }

[[group.policies]]
type = "target_tracking"
name = "cpu50"
target = 50

[[group.policies]]
type = "step"
name = "cpu-high"
alarm = { threshold = 80, comparison = ">", duration_s = 180 }
steps = [{ lower = 0, upper = 15, adjustment = 1 }, { lower = 15, adjustment = 3 }]

[[group.scheduled]]
name = "weekday-morning"
cron = "0 8 * * mon-fri"
min_size = 3

[[group]]
name = "batch"
min_size = 0
max_size = 4
desired = 0
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_toml_file_with_every_kind_of_setting(tmp_path: Path) -> None:
    web, batch = load_file(write(tmp_path, "groups.toml", TOML))
    assert web.name == "web"
    assert batch.name == "batch"
    assert web.template.provider == "libvirt"
    assert web.template.hosts == ["h1", "h2"]
    assert web.template.params == {"network": "default"}
    assert isinstance(web.policies[0], TargetTrackingPolicy)
    assert isinstance(web.policies[1], StepScalingPolicy)
    assert web.policies[1].alarm.duration_s == 180
    assert web.scheduled[0].min_size == 3
    assert batch.template.provider == "simulated"


def test_json_file_is_the_same_tree(tmp_path: Path) -> None:
    import tomllib

    data = tomllib.loads(TOML)
    from_toml = load_file(write(tmp_path, "g.toml", TOML))
    assert load_file(write(tmp_path, "g.json", json.dumps(data))) == from_toml
    assert load_file(write(tmp_path, "l.json", json.dumps(data["group"]))) == from_toml


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            '[[group]]\nname = "web"\nmin_size = 1\nmax_size = 3\ndesired = "two"\n',
            "group 'web' (#1): Expected `int`, got `str` - at `desired`",
        ),
        (
            '[[group]]\nname = "web"\nmin_size = 1\nmax_size = 3\ndesired = 2\n[group.template]\nvcpu = 2\n',
            "group 'web' (#1): Object contains unknown field `vcpu` - at `template`",
        ),
        (
            '[[group]]\nname = "web"\nmin_size = 4\nmax_size = 3\ndesired = 2\n',
            "max_size (3) is below min_size (4)",
        ),
        (
            '[[group]]\nname = "web"\nmin_size = 1\nmax_size = 3\ndesired = 2\n'
            '[[group.scheduled]]\nname = "s"\ncron = "0 25 * * *"\ndesired = 1\n',
            "scheduled action 's': cron '0 25 * * *': hour 25 is out of range; use 0-23",
        ),
        (
            '[[group]]\nname = "web"\nmin_size = 1\nmax_size = 3\ndesired = 2\n'
            '[[group.policies]]\ntype = "target"\nname = "p"\ntarget = 5\n',
            "Invalid value 'target' - at `policies[0].type`",
        ),
        (
            "[[group]]\nmin_size = 1\nmax_size = 3\ndesired = 2\n",
            "group #1: Object missing required field `name`",
        ),
        (
            '[[group]]\nname = "a"\nmin_size = 0\nmax_size = 0\ndesired = 0\n' * 2,
            "group 'a' (#2): a group named 'a' appears twice",
        ),
        ("[[group]\n", "not valid TOML"),
        ('[[groups]]\nname = "a"\n', "unknown top-level key(s) groups"),
    ],
)
def test_errors_name_file_group_and_field(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, "bad.toml", text)
    with pytest.raises(ApplyError) as info:
        load_file(path)
    assert str(info.value).startswith(f"{path}: ")
    assert words in str(info.value)


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ApplyError, match=r"use a \.toml or \.json file"):
        load_file(write(tmp_path, "g.yaml", ""))
    with pytest.raises(ApplyError, match="cannot read it"):
        load_file(tmp_path / "absent.toml")


def spec(name: str, desired: int = 1) -> GroupSpec:
    return GroupSpec(name=name, min_size=0, max_size=5, desired=desired)


def test_apply_specs_creates_updates_skips_and_prunes() -> None:
    put: list[str] = []
    deleted: list[str] = []
    existing = {"a": spec("a"), "b": spec("b"), "old": spec("old")}
    lines = apply_specs(
        [spec("a"), spec("b", 2), spec("c")],
        existing=existing,
        put=lambda s: put.append(s.name),
        delete=deleted.append,
        prune=True,
    )
    assert lines == ["unchanged a", "updated b", "created c", "deleted old"]
    assert put == ["b", "c"]
    assert deleted == ["old"]
    dry = apply_specs([spec("c")], existing=existing, put=lambda s: put.append(s.name), dry_run=True)
    assert dry == ["would be created c"]
    assert put == ["b", "c"]
    with pytest.raises(ApplyError, match="prune needs a delete function"):
        apply_specs([], existing={}, put=lambda s: None, prune=True)
