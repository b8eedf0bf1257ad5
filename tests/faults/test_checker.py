"""The fault checker's own accounting, on hand-made histories (no services needed)."""

from tests.faults.checker import (DbState, DeadLetterData, Delivery, DeviceData, DlqMessage, HostileMessage,
                                  PublishedEvent, RaceRound, ReceivedResult, ResultRowData, check, format_summary)


def result(event_id: str, port: str, host: str, seq: int, vif_type: str = "ovs", **extra) -> dict:
    return {"event_id": event_id, "port_id": port, "host": host, "seq": seq, "vif_type": vif_type, **extra}


def history():
    """Four events: e1 fine, e2 (a move) missing on its new host, e3 bound twice, e4 never published."""
    published = {
        "e1": PublishedEvent("e1", "port.create", "p1", frozenset({"h1"})),
        "e2": PublishedEvent("e2", "port.update", "p1", frozenset({"h1", "h2"})),
        "e3": PublishedEvent("e3", "port.create", "p3", frozenset({"h1"}), copies=2),
    }
    bodies = [result("e1", "p1", "h1", 1), result("e2", "p1", "h1", 2, "unbound"),
              result("e3", "p3", "h1", 3), result("e3", "p3", "h1", 4), result("e4", "p9", "h1", 5)]
    received = [ReceivedResult(b["host"], b) for b in bodies] + [ReceivedResult("h1", bodies[0], redelivered=True)]
    db = DbState(results=[ResultRowData(b["seq"], b["event_id"], b["port_id"], b["host"], b, True) for b in bodies])
    return published, received, db


def test_events_are_ok_lost_duplicated_or_unexpected():
    published, received, db = history()
    summary = check(published, received, db, {"p1": "h2", "p3": "h1"})
    assert summary["status"] == {"e1": "ok", "e2": "lost", "e3": "duplicated"}
    assert (summary["ok"], summary["lost"], summary["duplicated"]) == (1, 1, 1)
    assert summary["unexpected"] == 2  # e4 on the wire and in the outbox
    assert summary["redundant_copies"] == 1  # e1 again with the same seq and body: allowed
    assert summary["lost_committed"] == 0
    assert not summary["valid"]
    assert "VALID: False" in format_summary(summary)


def test_a_second_body_under_one_seq_is_a_duplicate_and_a_result_on_a_foreign_host_unexpected():
    published = {"e1": PublishedEvent("e1", "port.create", "p1", frozenset({"h1"}))}
    first, second = result("e1", "p1", "h1", 1), result("e1", "p1", "h1", 1, "binding_failed")
    db = DbState(results=[ResultRowData(1, "e1", "p1", "h1", first, True)])
    summary = check(published, [ReceivedResult("h1", first), ReceivedResult("h1", second),
                                ReceivedResult("h2", result("e1", "p1", "h2", 7))], db, {"p1": "h1"})
    assert summary["duplicated"] == 1 and summary["unexpected"] == 1 and summary["diverged"] == 1


def test_unconfirmed_and_missing_is_unknown_not_lost():
    published = {"e1": PublishedEvent("e1", "port.create", "p1", frozenset({"h1"}), confirmed=False)}
    summary = check(published, [], DbState(), {})  # where p1 ends is unknown too
    assert summary["unknown"] == 1 and summary["lost"] == 0 and summary["valid"]


def device(address: str, owner: str | None, host: str = "s1", dev_type: str = "type-VF",
           parent: str | None = "0000:81:00.0") -> DeviceData:
    return DeviceData(host, address, dev_type, parent, "allocated" if owner else "available", owner)


def test_pci_leaks_double_allocation_and_mismatch():
    published = {"c1": PublishedEvent("c1", "port.create", "p1", frozenset({"s1"})),
                 "c2": PublishedEvent("c2", "port.create", "p2", frozenset({"s1"})),
                 "d3": PublishedEvent("d3", "port.delete", "p3", frozenset({"s1"}))}
    bodies = [result("c1", "p1", "s1", 1, "hw_veb", pci_device={"address": "0000:81:10.0"}),
              result("c2", "p2", "s1", 2, "hw_veb", pci_device={"address": "0000:81:10.0"}),
              result("d3", "p3", "s1", 3, "unbound")]
    db = DbState(results=[ResultRowData(b["seq"], b["event_id"], b["port_id"], "s1", b, True) for b in bodies],
                 devices=[device("0000:81:10.0", "p1"), device("0000:81:10.1", "p3"), device("0000:81:10.2", "p1")],
                 violations={"s1": ["PF 0000:81:00.0 is allocated together with its functions 0000:81:10.0"]},
                 ports={"p1": "s1", "p2": "s1"})
    summary = check(published, [ReceivedResult("s1", b) for b in bodies], db, {"p1": "s1", "p2": "s1", "p3": None})
    assert summary["lost"] == summary["duplicated"] == 0
    assert summary["leaked"] == 1  # p3 was deleted, yet owns 10.1
    # p1 holds two devices; the tracker's PF/VF violation; p1 and p2's results name one device, and in
    # seq order s1 was told p2 has 10.0 while p1 still held it
    assert summary["double_allocated"] == 4
    assert summary["pci_mismatch"] == 1  # p2's result names 10.0, owned by p1


def test_hostile_messages_need_one_dead_letter_no_dlq_copy_and_their_refusal():
    good = HostileMessage("HOSTILE-00000-0000000a", "bad_json", "validate", "bad_json")
    refused = HostileMessage("HOSTILE-00001-0000000b", "extra_field", "validate", "bad_schema", "h1")
    twice = HostileMessage("HOSTILE-00002-0000000c", "not_utf8", "validate", "not_utf8")
    rows = [DeadLetterData(1, "validate", "bad_json: body is not JSON", None, b'{"x": "HOSTILE-00000-0000000a'),
            DeadLetterData(2, "validate", "bad_schema: evil: extra", "e", b'{"evil": "HOSTILE-00001-0000000b"}'),
            DeadLetterData(3, "validate", "not_utf8: …", None, b"\xffHOSTILE-00002-0000000c"),
            DeadLetterData(4, "validate", "not_utf8: …", None, b"\xffHOSTILE-00002-0000000c"),
            DeadLetterData(5, "select", "other: IntegrityError", "e9", b'{"jobs": []}')]
    refusal = result("e", "HOSTILE-00001-0000000b", "h1", 9, "binding_failed",
                     error="Refused: bad_schema: evil: extra")
    deliveries = [Delivery(good.marker, "validate", 10, 0, 1.0), Delivery(refused.marker, "validate", 10, 0, 1.0),
                  Delivery(twice.marker, "validate", 10, 0, 1.0), Delivery(twice.marker, "validate", 11, 1, 3.0)]
    db = DbState(results=[ResultRowData(9, "e", refusal["port_id"], "h1", refusal, True)], dead_letters=rows)
    summary = check({}, [ReceivedResult("h1", refusal)], db, {}, hostile=[good, refused, twice],
                    deliveries=deliveries)
    assert summary["unexpected"] == 0  # the refusal belongs to the hostile message
    assert summary["hostile_dead_lettered_once"] == 2 and summary["hostile_problems"] == 1
    assert summary["hostile_redeliveries_unexplained"] == 1  # pid 10 did not die, no fault in between
    assert summary["spurious_dead_letters"] == 1
    explained = check({}, [ReceivedResult("h1", refusal)], db, {}, hostile=[good, refused, twice],
                      deliveries=deliveries, dead_pids={10: 2.0})
    assert explained["hostile_redeliveries_explained"] == 1 and explained["hostile_redeliveries_unexplained"] == 0
    parked = [DlqMessage("binding.validate.dlq", good.marker.encode(), {"x-first-death-reason": "rejected"})]
    left = check({}, [ReceivedResult("h1", refusal)], db, {}, hostile=[good, refused], deliveries=deliveries[:2],
                 dlq=parked)
    assert left["hostile_problems"] == 1 and "left on binding.validate.dlq" in left["hostile_problem_ids"][0]


def test_a_message_the_broker_gave_up_on_is_a_failure_and_a_refused_request_needs_no_dead_letter():
    request = HostileMessage("HOSTILE-00004-0000000e", "unknown_port", "validate", "", "h1", dead_lettered=False,
                             refusal_error="InvalidInput: port_id")
    refusal = result("e4", request.marker, "h1", 3, "binding_failed", error="InvalidInput: port_id: port x")
    given_up = DeadLetterData(7, "allocate", "delivery_limit: the broker dead-lettered it", None, b'{"jobs": []}',
                              category="delivery_limit")
    db = DbState(results=[ResultRowData(3, "e4", request.marker, "h1", refusal, True)], dead_letters=[given_up])
    summary = check({}, [ReceivedResult("h1", refusal)], db, {}, hostile=[request])
    assert summary["hostile_problems"] == 0 and summary["spurious_dead_letters"] == 0
    assert summary["delivery_limited"] == 1 and not summary["valid"]
    recorded = DeadLetterData(8, "validate", "bad_schema: x", None, request.marker.encode())
    wrongly = check({}, [ReceivedResult("h1", refusal)], DbState(results=db.results, dead_letters=[recorded]), {},
                    hostile=[request])
    assert wrongly["hostile_problems"] == 1, "a well-formed request is refused, not dead-lettered"


def test_race_rounds_need_exactly_as_many_winners_as_devices():
    creates = [f"c{i}" for i in range(6)]
    bodies = [result(e, f"r{i}", "race", i, "hw_veb" if i < 2 else "binding_failed",
                     pci_device={"address": f"0000:81:10.{i}"} if i < 2 else None) for i, e in enumerate(creates)]
    exact = RaceRound("r1", "race", creates, [], devices=2, owned_after_delete=0)
    summary = check({}, [ReceivedResult("race", b) for b in bodies], DbState(), {}, races=[exact])
    assert summary["race_rounds"][0]["winners"] == 2 and summary["race_rounds_exact"] == 1
    bodies[1]["pci_device"] = {"address": "0000:81:10.0"}  # two winners, one device
    summary = check({}, [ReceivedResult("race", b) for b in bodies], DbState(), {}, races=[exact])
    assert summary["race_rounds_exact"] == 0 and summary["race_rounds"][0]["device_given_twice"] == ["0000:81:10.0"]


def test_a_hostile_message_the_harness_sent_twice_may_be_dead_lettered_twice():
    """A publish whose confirm a fault swallowed is sent again: both copies may have arrived, and a
    message without a readable event id is each time a message of its own."""
    twice = HostileMessage("HOSTILE-00003-0000000d", "bad_json", "validate", "bad_json", copies=2)
    rows = [DeadLetterData(n, "validate", "bad_json: body is not JSON", None, b'{"x": "HOSTILE-00003-0000000d')
            for n in (1, 2)]
    deliveries = [Delivery(twice.marker, "validate", 10, 0, 1.0), Delivery(twice.marker, "validate", 10, 0, 1.2)]
    summary = check({}, [], DbState(dead_letters=rows), {}, hostile=[twice], deliveries=deliveries)
    assert summary["hostile_problems"] == 0 and summary["hostile_redeliveries_unexplained"] == 0
    thrice = check({}, [], DbState(dead_letters=rows * 2), {}, hostile=[twice], deliveries=deliveries)
    assert thrice["hostile_problems"] == 1  # four rows for two copies


def test_a_grant_told_before_the_release_is_a_device_in_use_twice():
    """A host applying its results in seq order would plug one VF into two VMs between the grant
    to q and the release by p; the final device table alone shows nothing wrong."""
    vf = {"address": "0000:81:10.0"}
    release_late = [ReceivedResult("h1", result("e1", "p", "h1", 1, "hw_veb", pci_device=vf)),
                    ReceivedResult("h1", result("e2", "q", "h1", 2, "hw_veb", pci_device=vf)),
                    ReceivedResult("h1", result("e3", "p", "h1", 3, "unbound"))]
    summary = check({}, release_late, DbState(), {})
    assert summary["double_allocated"] == 1 and "seq 2 gives 0000:81:10.0 to q while p holds it" in \
        summary["double_allocated_ids"][0]
    in_order = [release_late[0], ReceivedResult("h1", result("e3", "p", "h1", 2, "unbound")),
                ReceivedResult("h1", result("e2", "q", "h1", 3, "hw_veb", pci_device=vf))]
    assert check({}, list(reversed(in_order)), DbState(), {})["double_allocated"] == 0, "seq order, not arrival"


def outbox_of(received: list[ReceivedResult]) -> DbState:
    """The outbox that published exactly these results."""
    return DbState(results=[ResultRowData(r.body["seq"], r.body["event_id"], r.body["port_id"], r.queue_host, r.body,
                                          True) for r in received])


def test_a_result_that_says_the_wrong_thing_and_a_host_left_bound_are_failures():
    """The old host of a move must hear ``unbound``, the new one a binding of the port's kind; the
    last word of a deleted port on every host is that it is not bound there."""
    move = PublishedEvent("m", "port.update", "p", frozenset({"a", "b"}), outcome_known=True, target="b",
                          bound_as=("ovs",))
    wrong = [ReceivedResult("a", result("m", "p", "a", 1, "ovs")),  # the old host bound, not told unbound
             ReceivedResult("b", result("m", "q", "b", 2, "ovs"))]  # another port's result
    summary = check({"m": move}, wrong, outbox_of(wrong), {"p": "b"})
    # a still bound, and b never told of p (the result it got names q)
    assert summary["wrong_outcome"] == 2 and summary["stale_bindings"] == 2 and not summary["valid"]
    right = [ReceivedResult("a", result("m", "p", "a", 1, "unbound")),
             ReceivedResult("b", result("m", "p", "b", 2, "ovs"))]
    assert check({"m": move}, right, outbox_of(right), {"p": "b"})["valid"]
    failed = [right[0], ReceivedResult("b", result("m", "p", "b", 2, "binding_failed", error=None))]
    assert check({"m": move}, failed, outbox_of(failed), {"p": "b"})["wrong_outcome_ids"][0].endswith(
        "binding_failed without a reason")


def test_an_overtaken_event_may_give_nothing_but_its_port_must_end_right():
    first = PublishedEvent("u", "port.update", "p", frozenset({"a", "b"}), overtaken=True, outcome_known=True,
                           target="b", bound_as=("ovs",))
    then = PublishedEvent("d", "port.delete", "p", frozenset({"a"}), outcome_known=True, target=None)
    received = [ReceivedResult("a", result("d", "p", "a", 5, "unbound"))]
    summary = check({"u": first, "d": then}, received, outbox_of(received), {"p": None})
    assert (summary["superseded"], summary["lost"], summary["ok"]) == (1, 0, 1) and summary["valid"]
    summary = check({"u": first, "d": then}, received[:0], DbState(), {"p": None})
    assert summary["lost"] == 1, "the latest event must answer"


def test_a_redelivery_is_explained_only_by_a_fault_between_the_two_deliveries():
    message = HostileMessage("HOSTILE-00005-0000000f", "bad_json", "validate", "bad_json")
    row = DeadLetterData(1, "validate", "bad_json: x", None, message.marker.encode())
    deliveries = [Delivery(message.marker, "validate", 10, 0, 1.0), Delivery(message.marker, "validate", 11, 1, 3.0)]
    later = check({}, [], DbState(dead_letters=[row]), {}, hostile=[message], deliveries=deliveries,
                  dead_pids={10: 50.0}, fault_windows=[(40.0, 41.0)])
    assert later["hostile_redeliveries_unexplained"] == 1, "pid 10 died long after: it explains nothing"
    between = check({}, [], DbState(dead_letters=[row]), {}, hostile=[message], deliveries=deliveries,
                    dead_pids={10: 2.0})
    assert between["hostile_redeliveries_unexplained"] == 0


def test_a_port_that_lets_go_of_its_device_and_binds_again_on_its_host_answers_once():
    """Back on the host it held a VF on, with another VF: ``unbound`` first (the old VF is free),
    then the binding. Two results of one event on one host in any other shape are a duplicate."""
    move = PublishedEvent("m", "port.update", "p", frozenset({"a"}), outcome_known=True, target="a",
                          bound_as=("hw_veb",))
    rebound = [ReceivedResult("a", result("m", "p", "a", 1, "unbound")),
               ReceivedResult("a", result("m", "p", "a", 2, "hw_veb", pci_device={"address": "0000:81:10.1"}))]
    devices = [device("0000:81:10.1", "p", host="a")]
    assert check({"m": move}, rebound, DbState(results=outbox_of(rebound).results, devices=devices), {"p": "a"})["valid"]
    twice = [rebound[1], ReceivedResult("a", result("m", "p", "a", 3, "hw_veb", pci_device={"address": "x"}))]
    summary = check({"m": move}, twice, outbox_of(twice), {"p": "a"})
    assert summary["duplicated"] == 1
    backwards = [ReceivedResult("a", result("m", "p", "a", 1, "hw_veb")), ReceivedResult("a", result("m", "p", "a", 2,
                                                                                                   "unbound"))]
    assert check({"m": move}, backwards, outbox_of(backwards), {"p": "a"})["duplicated"] == 1


def test_an_overtaken_event_may_end_on_its_host_with_the_release_of_its_device():
    """It let go of its VF there (allocate tells that at once), then a newer event of its port took
    over: nothing more of it reaches that host."""
    event = PublishedEvent("m", "port.update", "p", frozenset({"a", "b"}), overtaken=True, outcome_known=True,
                           target="b", bound_as=("hw_veb",))
    released = [ReceivedResult("b", result("m", "p", "b", 4, "unbound"))]
    assert check({"m": event}, released, outbox_of(released), {})["wrong_outcome"] == 0
    settled = PublishedEvent("m", "port.update", "p", frozenset({"a", "b"}), outcome_known=True, target="b",
                             bound_as=("hw_veb",))
    assert check({"m": settled}, released, outbox_of(released), {})["wrong_outcome"] == 1
