"""The hash-chained audit log (issue 17): records, rotation, retention,
the key, and `verify-log` against each kind of tampering.  Pure and file
level: no journald needed (anchors go to a writer that records them)."""

import errno
import hashlib
import io
import json
import os
import pwd
import re
import resource
import signal
import stat
import subprocess
import sys

import pytest

import pamsignal
from pamsignal import AuditLog, Event, parse_config


class Clock:
    """Wall time the test moves by hand."""

    def __init__(self, now_s=1764000000.0):
        self.now_s = now_s

    def __call__(self):
        return self.now_s


def settings(text=""):
    return parse_config("[audit]\n" + text).audit


def login(user="alice", ip="203.0.113.5", port=51234):
    return Event(timestamp_us=1764000000000000, action="login_success",
                 user=user, source_ip=ip, source_port=port, hostname="web1",
                 service="sshd", message="Accepted password for %s from %s "
                 "port %d ssh2" % (user, ip, port))


def write_log(directory, records=30, key=None, config="rotate_size=2K\n",
              clock=None, anchors=None):
    """An audit log of `records` events (plus start and stop records),
    rotated into several files; returns the AuditLog."""
    log = AuditLog(settings(config), str(directory), key, anchors,
                   clock or Clock())
    log.open()
    for number in range(records):
        event = login(port=1000 + number)
        assert log.append({"kind": "event", "id": pamsignal.alert_id(event),
                           "event": pamsignal.event_to_ecs(event)})
    log.close()
    return log


def verify(directory, *options, files=None):
    """verify-log as the admin runs it: (exit code, output)."""
    out = io.StringIO()
    config = os.path.join(str(directory), "none.conf")
    if not os.path.exists(config):
        with open(config, "w") as handle:
            handle.write("[pamsignal]\nlog_dir = %s\n" % directory)
    code = pamsignal.main(["--config", config, "verify-log"] +
                          list(options) + list(files or ()), stdout=out)
    return code, out.getvalue()


def files_of(directory):
    return pamsignal.audit_files(str(directory))


def lines_of(path):
    with open(path, "rb") as handle:
        return handle.readlines()


def rewrite(path, lines):
    with open(path, "wb") as handle:
        handle.writelines(lines)


def at(path, line):
    return "%s:%d:" % (path, line)


# ------------------------------------------------------------------- records


def test_a_record_hashes_its_documented_canonical_bytes():
    line, digest = pamsignal.chain_record(
        {"kind": "event", "z": 1, "a": "\u00e9"}, 7, "ab" * 32, 0)
    record = json.loads(line)
    assert record.pop("hash") == digest
    # what the README tells others to hash, rebuilt without pamsignal
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"))
    assert hashlib.sha256(canonical.encode("ascii")).hexdigest() == digest
    assert line == canonical.encode()[:-1] + (
        ',"hash":"%s"}\n' % digest).encode()
    assert (record["seq"], record["prev"], record["alg"]) == (
        7, "ab" * 32, "sha256")


def test_a_keyed_record_is_an_hmac_of_the_same_bytes():
    import hmac
    line, digest = pamsignal.chain_record({"kind": "x"}, 1,
                                          pamsignal.GENESIS_HASH, 0,
                                          key=b"k" * 32)
    record = json.loads(line)
    record.pop("hash")
    canonical = json.dumps(record, sort_keys=True,
                           separators=(",", ":")).encode()
    assert record["alg"] == "hmac-sha256"
    assert hmac.new(b"k" * 32, canonical, hashlib.sha256).hexdigest() == \
        digest


def test_an_intact_rotated_log_verifies(tmp_path):
    log = write_log(tmp_path)
    paths = files_of(tmp_path)
    assert len(paths) >= 4, "rotation by size made several files"
    code, out = verify(tmp_path)
    assert code == 0, out
    assert "%d records verified (seq 1 to %d), head %s" % (
        log.seq, log.seq, log.head) in out
    # each rotated file begins where the one before ended
    for before, after in zip(paths, paths[1:]):
        last = json.loads(lines_of(before)[-1])
        first = json.loads(lines_of(after)[0])
        assert (first["seq"], first["prev"]) == (last["seq"] + 1,
                                                 last["hash"])


def test_kinds_of_records_are_written(tmp_path):
    write_log(tmp_path, records=3, config="")
    kinds = [json.loads(line)["kind"] for line in
             lines_of(files_of(tmp_path)[-1])]
    assert kinds == ["agent_started", "event", "event", "event",
                     "agent_stopped"]


# ----------------------------------------------------------------- tampering


@pytest.fixture(params=["plain", "keyed"])
def keying(request, tmp_path_factory):
    """(key, verify-log options): each kind of tampering is caught in a
    plain SHA-256 chain and in an HMAC-keyed one alike."""
    if request.param == "plain":
        return None, []
    path = tmp_path_factory.mktemp("key") / "audit.key"
    path.write_bytes(b"k" * 32)
    return b"k" * 32, ["--key-file", str(path)]


def tamper(directory, index, edit, keying):
    """Write a log, change the lines of its file `index` with `edit`,
    verify: (that file, exit code, output)."""
    write_log(directory, key=keying[0])
    target = files_of(directory)[index]
    rewrite(target, edit(lines_of(target)))
    return (target,) + verify(directory, *keying[1])


def test_a_changed_byte_is_named_with_file_and_line(tmp_path, keying):
    target, code, out = tamper(tmp_path, 1, lambda lines: lines[:1] + [
        lines[1].replace(b"alice", b"alicf")] + lines[2:], keying)
    assert code == 1
    assert at(target, 2) in out and "changed" in out


def test_a_removed_record_is_named(tmp_path, keying):
    removed = []

    def remove(lines):
        removed.append(json.loads(lines[1])["seq"])
        return lines[:1] + lines[2:]

    target, code, out = tamper(tmp_path, 2, remove, keying)
    assert code == 1
    assert at(target, 2) in out
    assert "records seq %d removed" % removed[0] in out


@pytest.mark.parametrize("last", [{"last_seq": 1, "last_hash": [1]},
                                  {"last_seq": [1], "last_hash": "ab"},
                                  {"last_seq": {}, "last_hash": {}}])
def test_a_forged_removal_record_is_named_not_a_crash(tmp_path, last):
    # verify-log reads the removal records before it checks any record: a
    # value no agent writes (unhashable) must be a finding, not a crash.
    write_log(tmp_path, records=3, config="")
    target = files_of(tmp_path)[-1]
    forged = pamsignal.chain_record(dict(last, kind="removed"), 9,
                                    "0" * 64, 0)[0]
    rewrite(target, [forged] + lines_of(target))
    code, out = verify(tmp_path)
    assert code == 1
    assert at(target, 1) in out and "missing" in out


def test_an_inserted_copy_is_named(tmp_path, keying):
    def insert(lines):
        copy = lines_of(files_of(tmp_path)[0])[1]  # seq 2, copied later
        return lines[:2] + [copy] + lines[2:]

    target, code, out = tamper(tmp_path, 2, insert, keying)
    assert code == 1
    assert at(target, 3) in out
    assert "seq 2 was already at %s:2" % files_of(tmp_path)[0] in out


def test_swapped_records_are_out_of_order(tmp_path, keying):
    target, code, out = tamper(tmp_path, 1, lambda lines: lines[:1] + [
        lines[2], lines[1]] + lines[3:], keying)
    assert code == 1
    assert at(target, 2) in out and "out of order" in out


def test_a_deleted_rotated_file_is_a_gap(tmp_path, keying):
    write_log(tmp_path, key=keying[0])
    paths = files_of(tmp_path)
    os.unlink(paths[1])
    code, out = verify(tmp_path, *keying[1])
    assert code == 1
    assert at(paths[2], 1) in out and "removed before it" in out


def test_deleting_the_oldest_file_without_a_removal_record_is_caught(
        tmp_path):
    write_log(tmp_path)
    paths = files_of(tmp_path)
    first_seq = json.loads(lines_of(paths[1])[0])["seq"]
    os.unlink(paths[0])
    code, out = verify(tmp_path)
    assert code == 1
    assert at(paths[1], 1) in out
    assert "records 1 to %d are missing" % (first_seq - 1) in out


def test_a_truncated_tail_is_caught_only_by_the_head(tmp_path, keying):
    log = write_log(tmp_path, key=keying[0])
    current = files_of(tmp_path)[-1]
    lines = lines_of(current)
    kept = json.loads(lines_of(files_of(tmp_path)[0])[-1])  # an old head
    rewrite(current, lines[:1])
    # a shorter chain is still a valid chain...
    assert verify(tmp_path, *keying[1])[0] == 0
    # ...but it no longer reaches the head kept elsewhere
    code, out = verify(tmp_path, "--head", log.head, *keying[1])
    assert code == 1 and "does not reach head %s" % log.head in out
    # a head still in the chain: the records after it are the newer ones
    code, out = verify(tmp_path, "--head", kept["hash"], *keying[1])
    assert code == 0 and "seq %d, %d records written since" % (
        kept["seq"], json.loads(lines[0])["seq"] - kept["seq"]) in out


def test_a_rewritten_keyless_chain_passes_alone_but_not_the_anchor(
        tmp_path):
    """Without a key, whoever can write the log can recompute it: only
    the anchored head tells (what the README says it proves)."""
    log = write_log(tmp_path, config="")
    (path,) = files_of(tmp_path)
    prev, out_lines = pamsignal.GENESIS_HASH, []
    for line in lines_of(path):
        record = json.loads(line)
        record.pop("hash")
        body = {k: v for k, v in record.items()
                if k not in ("seq", "prev", "time", "alg")}
        if body.get("kind") == "event":
            body["event"]["source"]["ip"] = "198.51.100.1"
        new, prev = pamsignal.chain_record(body, record["seq"], prev, 0)
        out_lines.append(new)
    rewrite(path, out_lines)
    assert verify(tmp_path)[0] == 0
    code, out = verify(tmp_path, "--head", log.head)
    assert code == 1 and "does not reach head" in out


# -------------------------------------------------------------------- the key


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "audit.key"
    path.write_bytes(b"0123456789abcdef0123456789abcdef\n")
    os.chmod(str(path), 0o600)
    return str(path)


def test_a_keyed_log_needs_its_key(tmp_path, key_file):
    logs = tmp_path / "log"
    key = pamsignal.read_key_file(key_file)
    write_log(logs, key=key)
    assert verify(logs, "--key-file", key_file)[0] == 0
    code, out = verify(logs)
    assert code == 1 and "keyed" in out
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"another key of enough length!!")
    code, out = verify(logs, "--key-file", str(wrong))
    assert code == 1 and "hash does not match" in out


def test_a_fifo_given_as_the_key_file_is_refused_at_once(tmp_path):
    # verify-log run by root must not wait for ever on a FIFO someone put
    # where the key was (the old code opened it and blocked).
    write_log(tmp_path / "log", records=2)
    fifo = tmp_path / "audit.key"
    os.mkfifo(str(fifo))
    config = tmp_path / "none.conf"
    config.write_text("[pamsignal]\nlog_dir = %s\n" % (tmp_path / "log"))
    result = subprocess.run(
        [sys.executable, pamsignal.__file__, "--config", str(config),
         "verify-log", "--key-file", str(fifo)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert result.returncode == 2
    assert "--key-file %s" % fifo in result.stderr and "FIFO" in \
        result.stderr, result.stderr


def test_a_keyed_log_cannot_be_rewritten_without_the_key(tmp_path, key_file):
    logs = tmp_path / "log"
    write_log(logs, key=pamsignal.read_key_file(key_file), config="")
    (path,) = files_of(logs)
    lines = lines_of(path)
    record = json.loads(lines[1])
    record.pop("hash")
    record["event"]["user"]["name"] = "mallory"
    body = {k: v for k, v in record.items()
            if k not in ("seq", "prev", "time", "alg")}
    lines[1], _ = pamsignal.chain_record(body, record["seq"], record["prev"],
                                         0)
    rewrite(path, lines)
    code, out = verify(logs, "--key-file", key_file)
    assert code == 1 and at(path, 2) in out and "sha256" in out


@pytest.mark.parametrize("tamper, problem", [
    (lambda path: os.chmod(path, 0o640), "not readable by group"),
    (lambda path: open(path, "w").write("short"), "at least 16"),
])
def test_a_weak_key_file_is_refused(tmp_path, key_file, tamper, problem):
    if os.geteuid() != 0 and "group" in problem:
        pytest.skip("the owner check applies to root")
    tamper(key_file)
    with pytest.raises(pamsignal.ConfigError) as error:
        pamsignal.load_audit_key(key_file, str(tmp_path / "log"), None)
    assert problem in str(error.value)


def test_a_key_inside_the_log_directory_is_refused(tmp_path):
    inside = tmp_path / "audit.key"
    inside.write_bytes(b"x" * 32)
    with pytest.raises(pamsignal.ConfigError) as error:
        pamsignal.load_audit_key(str(inside), str(tmp_path), None)
    assert "inside log_dir" in str(error.value)


def test_a_credential_key_is_read_from_the_credentials_directory(tmp_path):
    (tmp_path / "audit-key").write_bytes(b"k" * 32 + b"\n")
    key = pamsignal.load_audit_key("credential:audit-key", "/var/log/x",
                                   str(tmp_path))
    assert key == b"k" * 32


# ------------------------------------------------- retention, repair, anchors


def test_retention_removes_old_files_and_records_it(tmp_path):
    clock = Clock()
    log = AuditLog(settings("rotate_size=2K\nretention=2d\nrotate_age=1d\n"),
                   str(tmp_path), None, None, clock)
    log.open()
    for day in range(5):
        for number in range(6):
            log.append({"kind": "event", "n": number, "day": day})
        clock.now_s += 86400
    log.close()
    removal = [json.loads(line) for path in files_of(tmp_path)
               for line in lines_of(path)
               if json.loads(line)["kind"] == "removed"]
    assert removal, "files older than 2 days were removed"
    assert all(not os.path.exists(os.path.join(str(tmp_path), name))
               for record in removal for name in record["files"])
    code, out = verify(tmp_path)
    assert code == 0, out
    first = json.loads(lines_of(files_of(tmp_path)[0])[0])["seq"]
    assert first > 1 and "(seq %d to" % first in out
    # a removal record cannot explain the deletion of a later file
    os.unlink(files_of(tmp_path)[0])
    assert verify(tmp_path)[0] == 1


def test_a_removal_is_in_the_file_before_a_crash_can_lose_it(tmp_path):
    # Records wait for the end of their batch, but not the one explaining
    # files that are already deleted: no entry read again would make it.
    clock = Clock()
    log = AuditLog(settings("rotate_size=1K\nretention=1h\n"),
                   str(tmp_path), None, None, clock)
    log.open()
    for number in range(20):
        log.append({"kind": "event", "n": number, "pad": "x" * 100})
        log.flush()
    clock.now_s += 7200
    log.flush()  # retention is due: rotated files go
    assert log.pending == []
    os.close(log.fd)  # the agent is killed here, before its next batch
    os.close(log.lock_fd)
    lines = pamsignal.ChainLines(files_of(tmp_path))
    assert pamsignal.verify_chain(lines).problem is None
    assert "removed" in [json.loads(line)["kind"] for _, _, line in lines]


def test_a_record_cut_short_by_a_crash_is_dropped_and_said(tmp_path):
    write_log(tmp_path, records=3, config="")
    (path,) = files_of(tmp_path)
    with open(path, "ab") as handle:
        handle.write(b'{"kind":"event","half')
    log = AuditLog(settings(""), str(tmp_path), None, None, Clock())
    log.open()
    log.close()
    kinds = [json.loads(line)["kind"] for line in lines_of(path)]
    assert kinds[-3:] == ["repaired", "agent_started", "agent_stopped"]
    assert json.loads(lines_of(path)[-3])["dropped_bytes"] == 21
    assert verify(tmp_path)[0] == 0


def test_an_event_record_names_the_event_as_its_alerts_do(tmp_path):
    # The id the pipeline's decision records use is the one the spool and
    # the SIEM give the same event; the record holds its ECS object.
    log = AuditLog(settings(""), str(tmp_path), None, None, Clock())
    log.open()
    events = [login(port=2000), login(user="bob", port=2000)]
    ids = [log.record_event(event) for event in events]
    log.close()
    assert ids == [pamsignal.alert_id(event) for event in events]
    assert ids[0] != ids[1]
    records = [json.loads(line) for line in lines_of(tmp_path / "audit.jsonl")]
    assert [(record["id"], record["event"]) for record in records
            if record["kind"] == "event"] == [
        (event_id, json.loads(pamsignal.dumps_safe(pamsignal.event_to_ecs(
            event)))) for event_id, event in zip(ids, events)]
    assert verify(tmp_path)[0] == 0


def append_events(log, count, flush_each=False):
    for number in range(count):
        event = login(port=1000 + number)
        assert log.append({"kind": "event", "id": pamsignal.alert_id(event),
                           "event": event})
        if flush_each:
            log.flush()


def anchored_seqs(anchors):
    return [int(entry["PAMSIGNAL_AUDIT_SEQ"]) for entry in anchors.sent]


class Anchors:
    """A JournalWriter that keeps what it was given, and checks that the
    head it is given is a record already in the log's files."""

    def __init__(self, directory=None, refuse=False):
        self.directory = directory
        self.refuse = refuse
        self.sent = []

    def send(self, fields):
        entry = dict(fields)
        self.sent.append(entry)
        if self.directory is not None:
            lines = pamsignal.ChainLines(files_of(self.directory))
            assert pamsignal.head_position(
                lines, entry["PAMSIGNAL_AUDIT_HEAD"]) == int(
                    entry["PAMSIGNAL_AUDIT_SEQ"])
        if self.refuse:  # journald gone
            raise OSError(errno.ENOENT, "No such file or directory")


def test_anchors_carry_the_head_every_n_records_and_at_close(tmp_path):
    anchors = Anchors(tmp_path)
    log = AuditLog(settings("anchor_every=10\n"), str(tmp_path), None,
                   anchors, Clock())
    log.open()
    append_events(log, 25, flush_each=True)  # a batch each, as when quiet
    log.close()
    heads = [(int(entry["PAMSIGNAL_AUDIT_SEQ"]), entry["PAMSIGNAL_AUDIT_HEAD"])
             for entry in anchors.sent]
    assert [seq for seq, _ in heads] == [10, 20, log.seq]
    assert all(entry["MESSAGE_ID"] == pamsignal.AUDIT_ANCHOR_MESSAGE_ID
               for entry in anchors.sent)
    lines = pamsignal.ChainLines(files_of(tmp_path))
    for seq, head in heads:
        assert pamsignal.head_position(lines, head) == seq


def records_on_disk(log):
    return len(lines_of(log.path))


@pytest.mark.parametrize("refuse", [False, True],
                         ids=["journal taking", "journal refusing"])
def test_an_anchor_waits_for_its_batch_on_disk(tmp_path, refuse):
    """A batch's records are written together at its end, anchors or not
    (an anchor made mid-batch wrote every later record with a write(2) of
    its own); the head is anchored once its batch is written and synced
    (Anchors checks it is in the file), and a refused anchor is tried
    again after anchor_every more records or anchor_interval, not at
    every batch, and said in the status until one is made."""
    clock = Clock()
    anchors = Anchors(tmp_path, refuse)
    log = AuditLog(settings("anchor_every=10\nanchor_interval=10m\n"),
                   str(tmp_path), None, anchors, clock)
    log.open()
    log.flush()
    on_disk = records_on_disk(log)
    append_events(log, 25)
    assert records_on_disk(log) == on_disk and anchors.sent == []
    log.flush()
    assert records_on_disk(log) == on_disk + 25
    assert anchored_seqs(anchors) == [log.seq]
    if not refuse:
        assert log.anchor_error is None
        log.close()
        return
    assert "cannot anchor in the journal" in log.anchor_error
    append_events(log, 9)
    log.flush()
    clock.now_s += 599
    log.flush()
    assert len(anchors.sent) == 1  # 9 records and 599 s: not yet
    append_events(log, 1)
    log.flush()  # the tenth record since
    clock.now_s += 599
    log.flush()
    clock.now_s += 1
    log.flush()  # 600 s since
    assert anchored_seqs(anchors) == [on_disk + 25, on_disk + 35, log.seq]
    anchors.refuse = False
    append_events(log, 10)
    log.flush()
    assert log.anchor_error is None
    assert anchored_seqs(anchors)[-1] == log.seq
    log.close()
    assert verify(tmp_path)[0] == 0


# ------------------------------------------------------------ alert decisions


def test_every_alert_decision_is_recorded(tmp_path):
    config = parse_config(
        "[channel:screen]\ntype = console\nevents = login_success, "
        "login_failure\ncooldown = 10m\n[channel:quiet]\ntype = console\n"
        "events = brute_force_detected\n")
    channels = pamsignal.build_channels(config)
    for channel in channels:
        channel.sink.stream = io.StringIO()
    pipeline = pamsignal.Pipeline(channels, config.detection,
                                  clock=lambda: 1764000000.0)
    pipeline.audit = AuditLog(config.audit, str(tmp_path), None, None,
                              Clock())
    pipeline.audit.open()
    failure = Event(timestamp_us=1764000000000000, action="login_failure",
                    user="root", source_ip="198.51.100.9", service="sshd",
                    reason="bad_password")
    pipeline._send(login())
    pipeline._send(failure)
    pipeline._send(failure._replace(timestamp_us=1764000001000000))
    pipeline.audit.close()
    records = [json.loads(line) for line in lines_of(files_of(tmp_path)[0])]
    decisions = [(r["channel"], r["action"], r["decision"], r.get("detail"))
                 for r in records if r["kind"] == "alert"]
    assert decisions == [
        ("screen", "login_success", "sent", None),
        ("quiet", "login_success", "filtered", "events"),
        ("screen", "login_failure", "sent", None),
        ("quiet", "login_failure", "filtered", "events"),
        ("screen", "login_failure", "held_back", "cooldown"),
        ("quiet", "login_failure", "filtered", "events"),
    ]
    events = [r for r in records if r["kind"] == "event"]
    assert [e["event"]["event"]["action"] for e in events] == [
        "login_success", "login_failure", "login_failure"]
    assert events[0]["id"] == [r for r in records if r["kind"] == "alert"][
        0]["id"]


def test_a_refused_record_is_counted_once(tmp_path):
    """While the disk refuses records, each is written at once and counted
    once: the not_written record that says so, refused with it, is said
    again, never counted as a lost record itself."""
    log = AuditLog(settings("anchor_every = off\n"), str(tmp_path), None,
                   None, Clock())
    log.open()
    log.flush()
    path = str(tmp_path / "audit.jsonl")
    # No write may make the file larger (EFBIG): a disk that refuses all.
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path), hard))
    try:
        assert log.append({"kind": "event", "n": 1})  # in the batch
        log.flush()
        assert "File too large" in log.error and log.lost == 1
        for number in range(2, 5):
            assert not log.append({"kind": "event", "n": number})
        assert (log.lost, log.unwritten, log.records) == (4, 4, 1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, ignored)
    assert log.append({"kind": "event", "n": 5})
    log.close()
    lines = pamsignal.ChainLines(files_of(tmp_path))
    assert pamsignal.verify_chain(lines).problem is None
    assert [(json.loads(line)["kind"], json.loads(line).get("records"))
            for _, _, line in lines] == [
        ("agent_started", None), ("not_written", 4), ("event", None),
        ("agent_stopped", 3)]


def test_the_log_file_is_private(tmp_path):
    write_log(tmp_path / "log", records=1, config="")
    mode = stat.S_IMODE(os.stat(files_of(tmp_path / "log")[0]).st_mode)
    assert mode == 0o600


def test_rotation_by_age_counts_from_the_first_record_across_restarts(
        tmp_path):
    clock = Clock()
    config = "rotate_age=1d\n"
    log = AuditLog(settings(config), str(tmp_path), None, None, clock)
    log.open()
    log.close()
    clock.now_s += 86400 - 60  # a restart just before the day is over
    log = AuditLog(settings(config), str(tmp_path), None, None, clock)
    log.open()
    assert len(files_of(tmp_path)) == 1
    clock.now_s += 120
    log.append({"kind": "event"})
    log.close()
    paths = files_of(tmp_path)
    assert len(paths) == 2
    assert [json.loads(line)["kind"] for line in lines_of(paths[-1])] == [
        "event", "agent_stopped"]
    assert verify(tmp_path)[0] == 0


@pytest.mark.parametrize("victim_text", [
    b"untouched\n",
    # its last line lacks a newline, as a torn record does: root cut it
    # through the link before the O_NOFOLLOW open
    b"root:x:0:0\nno newline at the end"], ids=["whole", "torn_looking"])
def test_a_planted_link_is_not_followed(tmp_path, victim_text):
    victim = tmp_path / "victim"
    victim.write_bytes(victim_text)
    logs = tmp_path / "log"
    logs.mkdir()
    os.symlink(str(victim), str(logs / "audit.jsonl"))
    log = AuditLog(settings(""), str(logs), None, None, Clock())
    log.open()
    assert not log.append({"kind": "event"})
    log.close()
    assert victim.read_bytes() == victim_text
    assert "is a symbolic link, not a regular file" in log.error
    assert log.unwritten == 3  # start, event, stop


def test_check_config_reads_the_key_as_the_service_would(tmp_path):
    config = tmp_path / "pamsignal.conf"
    config.write_text("[audit]\nkey = %s\n" % (tmp_path / "missing.key"))
    out = io.StringIO()
    assert pamsignal.main(["--config", str(config), "check-config"],
                          stdout=out) == 78
    (tmp_path / "missing.key").write_bytes(b"k" * 32)
    os.chmod(str(tmp_path / "missing.key"), 0o600)
    assert pamsignal.main(["--config", str(config), "check-config"],
                          stdout=out) == 0


def test_check_config_refuses_a_key_in_a_directory_another_user_owns(
        tmp_path, capsys):
    """Whoever owns the key's directory could swap in their own key (or a
    FIFO): as root, check-config names the line and the fix."""
    if os.geteuid() != 0:
        pytest.skip("the trust check applies to root")
    nobody = pwd.getpwnam("nobody")
    keys = tmp_path / "kd"
    keys.mkdir()
    (keys / "audit.key").write_bytes(b"k" * 32)
    os.chmod(str(keys / "audit.key"), 0o600)
    config = tmp_path / "pamsignal.conf"
    config.write_text("[audit]\nkey = %s\n" % (keys / "audit.key"))
    assert pamsignal.main(["--config", str(config), "check-config"],
                          stdout=io.StringIO()) == 0
    os.chown(str(keys), nobody.pw_uid, nobody.pw_gid)
    capsys.readouterr()
    assert pamsignal.main(["--config", str(config), "check-config"],
                          stdout=io.StringIO()) == 78
    assert "%s:2: [audit] key: %s is owned by nobody (uid %d), so whoever " \
        "can change it" % (config, keys, nobody.pw_uid) \
        in capsys.readouterr().err


@pytest.mark.parametrize("planted", ["fifo", "symlink"])
def test_a_key_that_is_not_a_plain_file_is_refused_not_waited_on(
        tmp_path, planted):
    """`mkfifo audit.key`: opening a FIFO waits for a writer for ever, so
    the agent would hang before it is ready. Run in a process of its own
    with a timeout, so a hang fails the test instead of the suite."""
    key = tmp_path / "audit.key"
    if planted == "fifo":
        os.mkfifo(str(key), 0o600)
    else:
        (tmp_path / "real.key").write_bytes(b"k" * 32)
        os.chmod(str(tmp_path / "real.key"), 0o600)
        os.symlink(str(tmp_path / "real.key"), str(key))
    config = tmp_path / "pamsignal.conf"
    config.write_text("[audit]\nkey = %s\n" % key)
    try:
        result = subprocess.run(
            [sys.executable, pamsignal.__file__, "--config", str(config),
             "check-config"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("check-config hung opening the key")
    assert result.returncode == 78
    assert "[audit] key: cannot read %s: is %s, not a regular file" % (
        key, "a FIFO" if planted == "fifo" else "a symbolic link") \
        in result.stderr


def test_a_second_agent_on_the_same_log_keeps_none(tmp_path):
    """One run by hand beside the service must not fork the chain."""
    first = AuditLog(settings(""), str(tmp_path), None, None, Clock())
    first.open()
    second = AuditLog(settings(""), str(tmp_path), None, None, Clock())
    second.open()
    assert not second.append({"kind": "event", "by": "second"})
    assert "another pamsignal keeps this audit log" in second.error
    assert first.append({"kind": "event", "by": "first"})
    second.close()
    first.close()
    assert verify(tmp_path)[0] == 0
    assert b"second" not in b"".join(lines_of(files_of(tmp_path)[0]))
    third = AuditLog(settings(""), str(tmp_path), None, None, Clock())
    third.open()  # free again once the first stopped
    assert third.error is None
    third.close()


def test_every_action_has_its_own_fixed_message_id():
    ids = pamsignal.EVENT_MESSAGE_IDS
    assert set(ids) == set(pamsignal.ACTIONS)
    every = list(ids.values()) + [pamsignal.AUDIT_ANCHOR_MESSAGE_ID]
    assert len(set(every)) == len(every)
    assert all(len(value) == 32 and int(value, 16) >= 0 and
               value == value.lower() for value in every)
    # an action without an entry still gets a fixed, distinct id
    assert pamsignal.event_message_id("some_new_action") == \
        pamsignal.event_message_id("some_new_action")
    assert pamsignal.event_message_id("some_new_action") not in every


def test_journal_fields_follow_the_flattening_rule():
    event = login()._replace(source_as_org="EXAMPLE-NET", target_user="bob",
                             users_tried=("a", "b"))
    fields = dict(pamsignal.event_journal_fields(event, "audit-test"))
    assert fields["SYSLOG_IDENTIFIER"] == "audit-test"
    assert fields["SOURCE_AS_ORGANIZATION_NAME"] == "EXAMPLE-NET"
    assert fields["USER_TARGET_NAME"] == "bob"
    assert fields["PAMSIGNAL_USERS_TRIED"] == "a,b"
    assert fields["TIMESTAMP"] == "2025-11-24T16:00:00.000000Z"
    assert fields["EVENT_ORIGINAL"].startswith("Accepted password")
    assert fields["PRIORITY"] == "4"  # severity 5
    assert not fields["MESSAGE"][:4].isdigit()  # no time: journald has it
    assert all(re.match(r"^[A-Z][A-Z0-9_]*$", name) for name in fields)


def test_the_native_protocol_framing():
    data = pamsignal.encode_journal_entry([("MESSAGE", "one\ntwo"),
                                           ("PRIORITY", "6")])
    assert data == (b"MESSAGE\n" + (7).to_bytes(8, "little") +
                    b"one\ntwo\nPRIORITY=6\n")
    with pytest.raises(ValueError):
        pamsignal.encode_journal_entry([("_UID", "0")])  # journald's own


def test_a_changed_key_does_not_extend_the_old_chain(tmp_path):
    write_log(tmp_path, records=2, config="")
    log = AuditLog(settings(""), str(tmp_path), b"k" * 32, None, Clock())
    log.open()
    assert not log.append({"kind": "event"})
    assert "written with another key or none" in log.error
    log.close()
    assert verify(tmp_path)[0] == 0  # the old chain is left as it was
    for path in files_of(tmp_path):
        os.rename(path, path + ".old")
    log = AuditLog(settings(""), str(tmp_path), b"k" * 32, None, Clock())
    log.open()
    log.close()
    (path,) = files_of(tmp_path)
    assert json.loads(lines_of(path)[0])["seq"] == 1


def test_the_agent_takes_its_key_from_a_credential(tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "audit-key").write_bytes(b"c" * 32 + b"\n")
    config = parse_config("[pamsignal]\nstate_dir = %s\nlog_dir = %s\n"
                          "[audit]\nkey = credential:audit-key\n" % (
                              tmp_path / "state", tmp_path / "log"))
    agent = pamsignal.Agent(config, [], environ={
        "CREDENTIALS_DIRECTORY": str(credentials)})
    agent.open_audit_log()
    agent.pipeline.audit.journal = None  # no anchors from this test
    agent.pipeline.audit.close()
    (path,) = files_of(tmp_path / "log")
    assert json.loads(lines_of(path)[0])["alg"] == "hmac-sha256"
    key_file = tmp_path / "copy.key"
    key_file.write_bytes(b"c" * 32)
    assert verify(tmp_path / "log", "--key-file", str(key_file))[0] == 0
    with pytest.raises(pamsignal.ConfigError):  # no credentials passed
        pamsignal.Agent(config, [], environ={}).open_audit_log()


# ------------------------------------------------- what log_dir may hold


def test_a_rotated_name_with_an_impossible_date_is_not_ours(tmp_path,
                                                              capsys):
    # It matched the name pattern and its date crashed every start.
    write_log(tmp_path, records=3, config="")
    odd = tmp_path / "audit-20241399T999999Z-000000000001.jsonl"
    odd.write_bytes(b"x\n")
    clock = Clock()
    log = AuditLog(settings("retention=1d\n"), str(tmp_path), None, None,
                   clock)
    log.open()
    log.flush()
    clock.now_s += 7200
    log.apply_retention(clock.now_s)
    log.close()
    assert log.error is None
    assert odd.read_bytes() == b"x\n"
    assert str(odd) not in files_of(tmp_path)
    assert capsys.readouterr().err.count(str(odd)) == 1  # said once
    assert verify(tmp_path)[0] == 0


class Hung(Exception):
    """Not an OSError: the code under test must not catch it."""


class within:
    """Fail, rather than hang the suite, when the block takes longer."""

    def __init__(self, seconds=10):
        self.seconds = seconds

    def __enter__(self):
        def expire(signum, frame):
            raise Hung("hung for %d s" % self.seconds)
        self.before = signal.signal(signal.SIGALRM, expire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.before)


@pytest.mark.parametrize("name", [
    "audit.jsonl", "audit-20250101T000000Z-000000000005.jsonl"])
def test_a_fifo_in_log_dir_is_an_error_not_a_hang(tmp_path, name):
    os.mkfifo(str(tmp_path / name))
    log = AuditLog(settings(""), str(tmp_path), None, None, Clock())
    with within():
        log.open()
        assert not log.append({"kind": "event"})
        log.close()
    assert "is a FIFO, not a regular file" in log.error
    assert stat.S_ISFIFO(os.lstat(str(tmp_path / name)).st_mode)


def test_a_huge_torn_tail_is_dropped_in_one_pass(tmp_path, monkeypatch):
    # A 40 MiB line without a newline took minutes (each step re-read and
    # re-counted everything read so far).
    write_log(tmp_path, records=2, config="")
    (path,) = files_of(tmp_path)
    with open(path, "ab") as handle:
        handle.write(b"a" * (40 << 20))
    log = AuditLog(settings(""), str(tmp_path), None, None, Clock())
    size = os.path.getsize(path)
    read = []
    pread = os.pread

    def counted(descriptor, length, offset):
        read.append(length)
        return pread(descriptor, length, offset)

    monkeypatch.setattr(os, "pread", counted)
    with within(120):  # a guard against a hang, not a measure of speed
        log.open()
        log.close()
    monkeypatch.undo()
    assert log.error is None
    assert json.loads(lines_of(path)[-3])["dropped_bytes"] == 40 << 20
    # one pass back over the torn tail, then the records' short lines
    assert 0 < sum(read) <= size + (1 << 20), sum(read)
    assert verify(tmp_path)[0] == 0


@pytest.mark.parametrize("damage", [
    b'{"kind":"event","seq":99}\n',  # changed, a newline at its end
    b"b" * (5 << 20) + b"\n"], ids=["changed", "over_long"])  # over long
def test_a_damaged_last_line_stops_the_log_rather_than_fork_it(
        tmp_path, damage):
    # It was skipped, and the chain began again at seq 1 in the same file:
    # verify-log failed for ever after, and nothing said why.
    write_log(tmp_path, records=2, config="")
    (path,) = files_of(tmp_path)
    with open(path, "ab") as handle:
        handle.write(damage)
    before = open(path, "rb").read()
    log = AuditLog(settings(""), str(tmp_path), None, None, Clock())
    with within():
        log.open()
        assert not log.append({"kind": "event"})
        log.close()
    assert "the last line of %s is not an intact record" % path in log.error
    assert open(path, "rb").read() == before
    code, out = verify(tmp_path)
    assert code == 1 and at(path, 5) in out  # the same line, named


def test_verify_log_names_a_fifo_rather_than_hang(tmp_path, capsys):
    write_log(tmp_path, records=2, config="")
    fifo = tmp_path / "audit-20250101T000000Z-000000000009.jsonl"
    os.mkfifo(str(fifo))
    with within():
        code, _ = verify(tmp_path)
    assert code == 1
    assert "cannot read %s: is a FIFO, not a regular file" % fifo in \
        capsys.readouterr().err


def test_verify_log_reads_no_line_longer_than_a_record(tmp_path):
    write_log(tmp_path, records=2, config="")
    (path,) = files_of(tmp_path)
    lines = lines_of(path)
    rewrite(path, lines[:2] + [b"c" * (64 << 20) + b"\n"] + lines[2:])
    code, out = verify(tmp_path)
    assert code == 1
    assert "%s longer than %d bytes" % (
        at(path, 3), pamsignal.MAX_AUDIT_RECORD_BYTES) in out
