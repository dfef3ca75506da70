"""Strict configs: unknown keys and out-of-range values are errors, all listed at once, in one
line naming the file and the field, never a traceback and never a value."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from common.cli import app
from common.errors import FedmergeError

runner = CliRunner()


def _recipe(tmp_path, tiny_parents, **extra):
    body = {"parent_a": str(tiny_parents[0]), "parent_b": str(tiny_parents[1]), **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_recipe_lists_every_unknown_key_at_once(tmp_path, tiny_parents):
    from server.recipe import load_recipe

    path = _recipe(
        tmp_path, tiny_parents, unknown_field=1, **{"lambda": 0.5},
        search={"grid_point": 5}, secagg={"timout": 30},
    )
    with pytest.raises(FedmergeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ")
    assert "\n" not in text
    for field in ("unknown_field", "lambda", "search.grid_point", "secagg.timout"):
        assert f"field '{field}': unknown key" in text, text


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"search": {"grid_points": 500}}, "search.grid_points"),
        ({"score_timeout": 10 * 86_400}, "score_timeout"),
        ({"secagg": {"timeout": 7200}}, "secagg.timeout"),
        ({"scoring": {"batch_size": 3}}, "scoring.batch_size"),
    ],
)
def test_recipe_values_are_bounded(tmp_path, tiny_parents, fields, field):
    from server.recipe import load_recipe

    with pytest.raises(FedmergeError, match=f"field '{field}'"):
        load_recipe(_recipe(tmp_path, tiny_parents, **fields))


def test_unknown_recipe_key_is_rejected_before_anything_is_submitted(tmp_path, tiny_parents):
    path = _recipe(tmp_path, tiny_parents, search={"grid_point": 5})
    stage = tmp_path / "staged"
    out = tmp_path / "out"
    res = runner.invoke(app, ["coordinator", "submit", str(path), "--stage-dir", str(stage),
                              "--out", str(out), "--flwr-home", str(tmp_path / "home")])
    assert isinstance(res.exception, FedmergeError), res.output
    assert "field 'search.grid_point': unknown key" in str(res.exception)
    assert "$ " not in res.output  # no flwr command was even printed
    assert not stage.exists() and not out.exists()


@pytest.fixture
def node_yaml(tmp_path, tiny_parents):
    def write(node_extra=None, conn_extra=None, policy=None, top=None):
        body = {
            "connection": {"superlink": "127.0.0.1:9093", "root_certificates": "ca.pem",
                           "auth_private_key": "n.key", **(conn_extra or {})},
            "node": {"site": "hospital-a", "data": "synthetic:", "parent_a": str(tiny_parents[0]),
                     "parent_b": str(tiny_parents[1]), "policy": policy or {},
                     **(node_extra or {})},
            **(top or {}),
        }
        path = tmp_path / "node.yaml"
        path.write_text(yaml.safe_dump(body))
        return path

    return write


def test_device_gpu_is_one_line_naming_field_and_allowed_values(node_yaml):
    path = node_yaml({"device": "gpu"})
    res = runner.invoke(app, ["node", "dry-run", str(path)])
    assert isinstance(res.exception, FedmergeError)
    text = str(res.exception)
    assert text == f"{path}: field 'node.device': Value error, expected one of cpu, cuda, " \
        "cuda:N or mps"


def test_node_file_lists_errors_of_every_section_at_once(node_yaml):
    from client.node_file import load_node_file

    path = node_yaml({"colour": "red"}, {"superlnk": "x"}, {"min_site": 3},
                     {"service": {"logdir": "x"}})
    with pytest.raises(FedmergeError) as err:
        load_node_file(path)
    text = str(err.value)
    for field in ("connection.superlnk", "service.logdir", "node.colour", "node.policy.min_site"):
        assert f"field '{field}': unknown key" in text, text


def test_no_value_is_echoed_in_a_validation_error(node_yaml):
    """A value pasted into the wrong field (here: patient text) never reaches the terminal."""
    from client.node_file import load_node_file

    text = "Patient is a 67 year old male admitted with septic shock"
    with pytest.raises(FedmergeError) as err:
        load_node_file(node_yaml({"threads": text}))
    assert "septic" not in str(err.value) and "field 'node.threads'" in str(err.value)


def test_no_typer_app_prints_locals_in_a_traceback():
    import typer

    seen = []

    def walk(t: typer.Typer) -> None:
        seen.append(t)
        assert t.pretty_exceptions_show_locals is False, t.info.name
        for group in t.registered_groups:
            walk(group.typer_instance)

    walk(app)
    assert len(seen) >= 4  # fedmerge, certs, node, coordinator, demo-parents


def test_synthetic_site_selector_keeps_one_site():
    from common.data import load_records

    every = load_records("synthetic:sites=3,stays=10,seed=0")
    one = load_records("synthetic:sites=3,stays=10,seed=0,site=1")
    assert [r.stay_id for r in one] == [r.stay_id for r in every if r.site_id == "site-1"]
    assert len(one) == 10
    with pytest.raises(FedmergeError, match=r"site=site-7 selects no stays \(expected one of: "
                       r"site-0, site-1, site-2\)"):
        load_records("synthetic:sites=3,stays=10,seed=0,site=7")


def test_eicu_select_keeps_one_site(eicu_demo_dir):
    from common.data import load_records

    every = load_records(f"eicu:{eicu_demo_dir}?site=region")
    region = sorted({r.site_id for r in every})[0]
    one = load_records(f"eicu:{eicu_demo_dir}?site=region&select={region}")
    assert len(one) == sum(r.site_id == region for r in every) and len(one) < len(every)
    from common.data.select import select_site

    with pytest.raises(FedmergeError, match="select=Atlantis selects no stays"):
        select_site(every, "Atlantis", "eicu:demo", "select")
