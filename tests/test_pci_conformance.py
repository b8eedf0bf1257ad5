"""conformance/pci: every scenario replayed through PciTracker against what real Nova 34 did.

Judged as the suite's README says, operation by operation: where Nova's choice of device was
arbitrary, our own deterministic choice must be one Nova could have made (one of its candidates);
the operation is then replayed with Nova's own choice (``prefer``) so that states stay comparable,
and success, error, reason and the state of every device after it must equal Nova's. Beyond
that contract this also compares stage, the request spec, the candidate set, blocked devices,
owners, the device_spec, the untracked devices and the initial pools.
"""

import io
import json
from pathlib import Path

import pytest

from pipeline.models.pci import PciAllocateOp, PciScenario
from pipeline.pci_dry_run import evaluate_pci_scenarios, main_pci_dry_run
from pipeline.stages.pci_accounting import PciTracker, invariant_violations
from pipeline.stages.pci_devspec import DeviceSpec, PciConfigError

PCI_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "pci"
EXAMPLES = json.loads((PCI_DIR / "examples.json").read_text(encoding="utf-8"))
EXPECTED = json.loads((PCI_DIR / "expected.json").read_text(encoding="utf-8"))


def _canonical(pools: list[dict]) -> list[str]:
    return sorted(json.dumps(p, sort_keys=True) for p in pools)


def _fork(tracker: PciTracker) -> PciTracker:
    snapshot = tracker.snapshot()
    return PciTracker.from_snapshot(tracker.inventory, {a: s for a, (s, _) in snapshot.items()},
                                    {a: o for a, (_, o) in snapshot.items() if o})


def test_examples_and_expected_line_up() -> None:
    assert [s["id"] for s in EXAMPLES] == [e["id"] for e in EXPECTED]
    assert len(EXAMPLES) == 61


@pytest.mark.parametrize(("scenario", "expected"), list(zip(EXAMPLES, EXPECTED, strict=True)),
                         ids=[s["id"] for s in EXAMPLES])
def test_scenario(scenario: dict, expected: dict) -> None:
    parsed = PciScenario.model_validate(scenario)
    assert DeviceSpec(parsed.host).as_config() == expected["device_spec"]
    if "config_error" in expected:
        with pytest.raises(PciConfigError) as raised:
            PciTracker.from_inventory(parsed.host)
        assert raised.value.error == expected["config_error"]["error"]
        return
    tracker = PciTracker.from_inventory(parsed.host)
    assert tracker.untracked == sorted(expected["untracked"])
    assert tracker.state() == expected["initial_state"]
    assert _canonical(tracker.pools()) == _canonical(expected["initial_pools"])

    for op, want in zip(parsed.operations, expected["results"], strict=True):
        label = f"op {want['index']} ({op.op} {op.port_id})"
        if isinstance(op, PciAllocateOp):
            own = _fork(tracker).allocate(op)
            assert own.success == want["success"], f"{label}: {own.message}"
            assert sorted(own.candidates) == sorted(want["candidates"]), label
            if own.success:
                assert own.device.address in want["candidates"], label
            nova_choice = (want["device"] or {}).get("address")
            got = tracker.allocate(op, prefer=nova_choice)
            assert (got.success, got.error, got.reason, got.stage) == (
                want["success"], want["error"], want["reason"], want["stage"]), f"{label}: {got.message}"
            assert got.pci_request == want["pci_request"], label
            assert (got.device.address if got.device else None) == nova_choice, label
            assert got.blocked == want.get("blocked"), label
            assert got.device_status == want.get("device_status"), label
        else:
            got = tracker.release(op.port_id)
            assert got.released == want["released"], label
            assert got.noop == want.get("noop", False), label
        assert tracker.state() == want["state"], label
        assert tracker.owners() == want["owners"], label
        assert invariant_violations(tracker) == [], label


def test_dry_run_output_matches_until_its_first_own_choice() -> None:
    """The dry run makes its own choices; up to the first one that differs from Nova's, it is Nova."""
    outputs = evaluate_pci_scenarios(EXAMPLES)
    for output, expected in zip(outputs, EXPECTED, strict=True):
        assert output["id"] == expected["id"]
        assert output["device_spec"] == expected["device_spec"]
        if "config_error" in expected:
            assert output["config_error"]["error"] == expected["config_error"]["error"]
            continue
        assert (output["untracked"], output["initial_state"]) == (expected["untracked"], expected["initial_state"])
        assert len(output["results"]) == len(expected["results"])
        for got, want in zip(output["results"], expected["results"]):
            keys = ("index", "op", "port_id", "success", "error", "reason")
            assert {k: got[k] for k in keys} == {k: want.get(k) for k in keys}, (expected["id"], want["index"])
            if got["device"] != want.get("device"):
                assert got["device"]["address"] in want["candidates"]
                break
            assert (got["state"], got["owners"]) == (want["state"], want["owners"])


def test_dry_run_reports_a_malformed_scenario_and_goes_on() -> None:
    bad = json.loads(json.dumps(EXAMPLES[0]))
    bad["host"]["devices"][1]["address"] = "0000:81:10.9"
    outputs = evaluate_pci_scenarios([bad, "not a scenario", EXAMPLES[1]])
    assert outputs[0]["id"] == bad["id"]
    assert outputs[0]["error"].startswith("InvalidInput: host.devices.1.address: '0000:81:10.9' is not a PCI address")
    assert outputs[1] == {"id": None, "error": "InvalidInput: (scenario): must be a JSON object, got str"}
    assert outputs[2]["id"] == EXAMPLES[1]["id"] and "results" in outputs[2]


def test_dry_run_result_shape() -> None:
    [output] = evaluate_pci_scenarios([EXAMPLES[0]])
    first, second = output["results"]
    assert first["device"] == EXPECTED[0]["results"][0]["device"]
    assert first["pci_request"] == EXPECTED[0]["results"][0]["pci_request"]
    assert "p1" in first["message"] and "physnet1" in first["message"] and "legacy" in first["message"]
    assert second["blocked"] == {"0000:81:10.0": "allocated"}
    assert "exhausted" == second["reason"] and "0000:81:10.0 allocated" in second["message"]


def test_main_reads_a_file_and_stdin(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    path = tmp_path / "scenarios.json"
    path.write_text(json.dumps(EXAMPLES[:2]), encoding="utf-8")
    assert main_pci_dry_run(str(path)) == 0
    from_file = json.loads(capsys.readouterr().out)
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(EXAMPLES[:2])))
    assert main_pci_dry_run("-") == 0
    out = capsys.readouterr().out
    assert json.loads(out) == from_file
    assert out == json.dumps(from_file, indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize(("content", "needle"), [
    ("{not json", "cannot evaluate"),
    ('{"id": "x"}', "expected a JSON list of PCI scenarios, got dict"),
    (None, "cannot read"),
])
def test_main_exits_2_on_unusable_input(tmp_path: Path, capsys: pytest.CaptureFixture, content: str | None,
                                        needle: str) -> None:
    path = tmp_path / "in.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    assert main_pci_dry_run(str(path)) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and needle in captured.err and "pci-dry-run" in captured.err
