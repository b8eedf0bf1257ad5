"""A copy of an old job that comes back late (a redelivery, a re-publish from an upstream mark)
changes nothing, even when the port it names has since been deleted and created again with the
same id: the new port starts again at revision 1, so only the stage marks tell the copy apart."""

from datetime import timedelta

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from pipeline.db import run_transaction
from pipeline.models.jobs import BindingJob
from pipeline.models.tables import ResultRow
from tests.test_reports import T0, Pipeline, ovs_port, pipeline, settings, sriov_port  # noqa: F401 - fixtures

VF0 = "0000:81:10.0"


def owners(pipe: Pipeline) -> dict[str, str]:
    with pipe.engine.connect() as conn:
        rows = conn.execute(text("SELECT address, owner_port_id FROM pci_devices WHERE owner_port_id IS NOT NULL"))
        return {address: owner for address, owner in rows}


def test_a_late_copy_of_a_first_incarnations_job_leaves_the_new_ports_device_alone(pipeline: Pipeline):  # noqa: F811
    _, first_jobs = pipeline.send("port.create", ovs_port("p"), T0 + timedelta(seconds=1), until="select")
    assert [(j.port_id, j.revision, j.action) for j in first_jobs] == [("p", 1, "bind")]
    pipeline.run(first_jobs, "allocate")  # the OVS binding: no device
    pipeline.send("port.delete", {"id": "p"}, T0 + timedelta(seconds=2))
    pipeline.send("port.create", sriov_port("p"), T0 + timedelta(seconds=3))  # same id, revision 1 again
    assert owners(pipeline) == {VF0: "p"}
    with Session(pipeline.engine) as session:
        results = session.scalar(select(func.count()).select_from(ResultRow))

    allocate = pipeline.handlers["allocate"]
    again = run_transaction(pipeline.engine, lambda session: allocate.handle(session, first_jobs))
    assert again.duplicates == 1 and len(again.publishes) == 1  # recognised by its mark: what it handed on, again
    pipeline.run([BindingJob.model_validate(again.publishes[0].body)], "compose")  # compose recognises it too
    assert owners(pipeline) == {VF0: "p"}, "the late copy released the new port's VF"
    with Session(pipeline.engine) as session:
        assert session.scalar(select(func.count()).select_from(ResultRow)) == results
