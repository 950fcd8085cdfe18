"""DICOM TLS in and out (issue 11): dcmtk's storescu stores to the node over TLS, clients without a
valid certificate are refused and audited while the node keeps serving, calling AEs bound to a
certificate subject, plain DICOM to a TLS port, the node's results sent to Orthanc over DICOM TLS
(and Orthanc storing back), and the config forms. Certificates come from a throwaway CA
(:mod:`tls_certs`); every database check runs on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from dicom_helpers import (
    MODALITY_AE,
    NODE_AE,
    NodeFactory,
    RunningNode,
    add_output,
    events,
    instances,
    load,
    mammogram,
    transmission,
)
from peers import LOOPBACK, Orthanc, OrthancTLS, free_port, storescu
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from tls_certs import MODALITY_SUBJECT, OTHER_MODALITY_SUBJECT, Identity, ThrowawayPKI, make_pki

from node import audit
from node.config import AllowedPeer, ConfigError, Destination, DestinationTLS, NodeConfig, load_config
from node.db.models import Association, AuditEvent, utcnow
from node.dicom import allowlist, tls
from node.dicom.allowlist import AllowList
from node.dicom.scp import start_scp
from node.dicom.sender import deliver_due, echo

OrthancFactory = Callable[..., Orthanc]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_node(node_scp: NodeFactory, pki: ThrowawayPKI, **overrides: Any) -> RunningNode:
    """The node's SCP speaking DICOM TLS, client certificates from the test CA required."""
    values: dict[str, Any] = {
        "tls_certificate": pki.node.certificate,
        "tls_private_key": pki.node.key,
        "tls_ca_certificates": pki.ca,
        "tls_require_client_certificate": True,
    }
    return node_scp(**{**values, **overrides})


def tls_storescu(
    files: list[Path], port: int, pki: ThrowawayPKI, identity: Identity | None, aet: str = MODALITY_AE
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu over TLS (its default BCP 195 profile), checking the node's certificate
    against the test CA; ``identity`` None: anonymous TLS, no client certificate."""
    who = ["+tla"] if identity is None else ["+tls", str(identity.key), str(identity.certificate), "-pw"]
    return storescu(files, port, aet=aet, syntax="-xe", extra=[*who, "+cf", str(pki.ca)], timeout=120)


def wait_for_events(
    sessions: sessionmaker[Session], event: str, n: int = 1, timeout: float = 20.0
) -> list[AuditEvent]:
    """The ``event`` rows once there are ``n`` (a refused handshake is audited by the node's
    thread after the client has already gone)."""
    deadline = time.monotonic() + timeout
    while True:
        found = events(sessions, event)
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


# -- dcmtk to the node ------------------------------------------------------------------------------


@pytest.mark.dcmtk
def test_dcmtk_storescu_over_tls_is_stored(node_scp: NodeFactory, pki: ThrowawayPKI, tmp_path: Path) -> None:
    node = tls_node(node_scp, pki)
    run = tls_storescu([mammogram(tmp_path, "a")], node.port, pki, pki.modality)
    assert run.returncode == 0, run.stderr
    [instance] = instances(node.sessions)
    assert instance.sop_instance_uid == load(tmp_path / "a.dcm").SOPInstanceUID
    [accepted] = events(node.sessions, audit.ASSOCIATION_ACCEPTED)
    details = accepted.details or {}
    assert accepted.calling_ae == MODALITY_AE and str(details["tls"]).startswith("TLSv1.")
    assert details["client_certificate"] == MODALITY_SUBJECT


@pytest.mark.dcmtk
@pytest.mark.parametrize(
    ("client", "detail"),
    [(None, "(none presented)"), ("rogue", "(unable to get local issuer certificate)")],
    ids=["no-certificate", "other-ca"],
)
def test_a_client_without_a_valid_certificate_is_refused_and_audited(
    node_scp: NodeFactory, pki: ThrowawayPKI, tmp_path: Path, client: str | None, detail: str
) -> None:
    node = tls_node(node_scp, pki)
    refused = tls_storescu([mammogram(tmp_path, "a")], node.port, pki, pki.rogue if client else None)
    assert refused.returncode != 0
    [event] = wait_for_events(node.sessions, audit.ASSOCIATION_REJECTED)
    reason = str((event.details or {}).get("reason"))
    assert reason.startswith("TLS handshake failed: no valid client certificate ") and detail in reason
    assert event.calling_ae is None and event.peer is not None and event.peer.startswith(f"{LOOPBACK}:")
    with node.sessions() as session:
        row = session.scalars(select(Association)).one()
    assert (row.accepted, row.peer_host, row.calling_ae, row.reason) == (False, LOOPBACK, "", reason)
    assert instances(node.sessions) == []
    kept = tls_storescu([mammogram(tmp_path, "b", number=2)], node.port, pki, pki.modality)
    assert kept.returncode == 0, kept.stderr  # the node keeps serving
    assert len(instances(node.sessions)) == 1
    assert _connection_threads_end()  # the refused connection's thread is gone


def _connection_threads_end(timeout: float = 10.0) -> bool:
    """Whether every thread the server started for a connection ends (handshakes, associations)."""
    deadline = time.monotonic() + timeout
    while any(
        "process_request_thread" in t.name or "AcceptorThread" in t.name for t in threading.enumerate()
    ):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.dcmtk
def test_plain_dicom_to_the_tls_port_fails_cleanly(
    node_scp: NodeFactory, pki: ThrowawayPKI, tmp_path: Path
) -> None:
    node = tls_node(node_scp, pki, tls_require_client_certificate=False)
    started = time.monotonic()
    plain = storescu([mammogram(tmp_path, "a")], node.port, syntax="-xe", timeout=120)
    assert plain.returncode != 0 and time.monotonic() - started < 30
    [event] = wait_for_events(node.sessions, audit.ASSOCIATION_REJECTED)
    assert str((event.details or {}).get("reason")).startswith(
        "TLS handshake failed: the client does not speak TLS"
    )
    with socket.create_connection((LOOPBACK, node.port), timeout=5):  # a silent client stalls no one
        run = tls_storescu([mammogram(tmp_path, "b", number=2)], node.port, pki, pki.modality)
    assert run.returncode == 0, run.stderr
    assert len(instances(node.sessions)) == 1


@pytest.mark.dcmtk
@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ("modality", None),
        ("other_modality", allowlist.WRONG_CERTIFICATE),
        ("rogue", "TLS handshake failed: no valid client certificate"),
        (None, allowlist.NO_CERTIFICATE),
    ],
    ids=["its-certificate", "another-valid-certificate", "its-subject-from-another-ca", "no-certificate"],
)
def test_an_ae_bound_to_a_certificate_subject(
    node_scp: NodeFactory, pki: ThrowawayPKI, tmp_path: Path, client: str | None, reason: str | None
) -> None:
    bound = AllowedPeer.parse(f"{MODALITY_AE}@localhost#{MODALITY_SUBJECT}")
    node = tls_node(node_scp, pki, tls_require_client_certificate=False, allowed_aes=(bound,))
    identity = getattr(pki, client) if client is not None else None
    run = tls_storescu([mammogram(tmp_path, "a")], node.port, pki, identity)
    if reason is None:
        assert run.returncode == 0, run.stderr
        assert len(instances(node.sessions)) == 1
        return
    assert run.returncode != 0 and instances(node.sessions) == []
    [event] = wait_for_events(node.sessions, audit.ASSOCIATION_REJECTED)
    assert str((event.details or {}).get("reason")).startswith(reason)
    if client == "other_modality":  # refused after the handshake: the AE and the certificate are named
        assert event.calling_ae == MODALITY_AE
        assert (event.details or {}).get("client_certificate") == OTHER_MODALITY_SUBJECT


def test_bad_tls_files_stop_the_scp_before_its_port_opens(pki: ThrowawayPKI, tmp_path: Path) -> None:
    port = free_port()
    config = NodeConfig(
        port=port, bind_address=LOOPBACK, data_dir=tmp_path, tls_certificate=pki.node.certificate,
        tls_private_key=pki.pacs.key,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="is not the key of tls_certificate"):
        start_scp(config, sessionmaker())  # never reached: no database needed
    with pytest.raises(OSError):  # nothing listens
        socket.create_connection((LOOPBACK, port), timeout=2).close()


# -- the node to Orthanc, and back ----------------------------------------------------------------


@pytest.mark.peers
def test_results_go_to_orthanc_over_dicom_tls_and_orthanc_stores_back(
    orthanc: OrthancFactory,
    node_scp: NodeFactory,
    pki: ThrowawayPKI,
    tmp_path: Path,
    sessions: sessionmaker[Session],
) -> None:
    node_port = free_port()
    pacs = orthanc(
        {"mammonode": (NODE_AE, LOOPBACK, node_port)},
        tls=OrthancTLS(pki.pacs.certificate, pki.pacs.key, pki.ca),
    )
    destination = Destination.parse(f"{pacs.destination};tls")
    now = utcnow()
    config = NodeConfig(
        ae_title=NODE_AE,
        data_dir=tmp_path / "sender",
        destinations=(destination,),
        tls_certificate=pki.node.certificate,
        tls_private_key=pki.node.key,
        tls_ca_certificates=pki.ca,
    )
    files = [mammogram(tmp_path, "a"), mammogram(tmp_path, "b", laterality="R", number=2)]
    tx_tls = add_output(sessions, config, files[0], str(destination), now=now)
    tx_queued_in_clear = add_output(sessions, config, files[1], pacs.destination, now=now)  # before TLS
    assert deliver_due(config, sessions, now) == 2
    assert transmission(sessions, tx_tls).state == "sent"
    assert transmission(sessions, tx_queued_in_clear).state == "sent"  # follows the destination's TLS
    stored = sorted(pacs.simplified_tags(i)["SOPInstanceUID"] for i in pacs.wait_for_instances(2))
    assert stored == sorted(str(load(f).SOPInstanceUID) for f in files)
    assert echo(LOOPBACK, pacs.dicom_port, pacs.aet, NODE_AE, over_tls=DestinationTLS(), config=config).ok
    assert not echo(LOOPBACK, pacs.dicom_port, pacs.aet, NODE_AE).ok  # Orthanc's port is TLS only

    node = tls_node(node_scp, pki, port=node_port)  # Orthanc, the PACS, stores back over TLS
    summary = pacs.send_to_modality("mammonode", pacs.instances()[:1])
    assert summary.get("FailedInstancesCount", 0) == 0 and len(instances(node.sessions)) == 1
    [accepted] = events(node.sessions, audit.ASSOCIATION_ACCEPTED)
    assert (accepted.details or {}).get("client_certificate") == "CN=pacs.example/O=Radiology"


@pytest.mark.peers
def test_a_tls_destination_that_refuses_the_node_is_retried_until_fixed(
    orthanc: OrthancFactory, pki: ThrowawayPKI, tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    """Orthanc requires a client certificate and the node has none, or the node does not trust
    Orthanc's CA: a failure of the destination (retried with backoff, audited), and delivery
    resumes once the node's TLS files are right. ``mammonode send``/``echo`` speak TLS too."""
    pacs = orthanc(
        {"mammonode": (NODE_AE, LOOPBACK, free_port())},
        tls=OrthancTLS(pki.pacs.certificate, pki.pacs.key, pki.ca),
    )
    now = utcnow()
    good = NodeConfig(
        ae_title=NODE_AE,
        data_dir=tmp_path / "node",
        tls_certificate=pki.node.certificate,
        tls_private_key=pki.node.key,
        tls_ca_certificates=pki.ca,
    )
    no_certificate = replace(good, tls_certificate=None, tls_private_key=None)
    wrong_ca = replace(good, tls_ca_certificates=pki.rogue_ca)
    files = [mammogram(tmp_path, f"f{n}", number=n) for n in (1, 2)]
    for file, config in zip(files, (no_certificate, wrong_ca), strict=True):
        tx = add_output(sessions, config, file, f"{pacs.destination};tls", now=now)
        assert deliver_due(config, sessions, now) == 1
        row = transmission(sessions, tx)
        assert row.state == "failed" and row.last_error and "TLS handshake failed" in row.last_error
    assert pacs.instances() == [] and len(events(sessions, audit.RESULT_FAILED)) == 2
    assert deliver_due(good, sessions, now + dt.timedelta(hours=2)) == 2  # fixed: both are delivered
    assert len(events(sessions, audit.RESULT_SENT)) == 2 and len(pacs.wait_for_instances(2)) == 2

    toml = tmp_path / "node.toml"
    toml.write_text(
        f'ae_title = "{NODE_AE}"\ntls_certificate = "{pki.node.certificate}"\n'
        f'tls_private_key = "{pki.node.key}"\ntls_ca_certificates = "{pki.ca}"\n',
        encoding="utf-8",
    )
    to = f"{pacs.destination};tls"
    sent = _mammonode("send", str(mammogram(tmp_path, "f3", number=3)), "--to", to, "--config", str(toml))
    assert sent.returncode == 0 and f"sent 1 of 1 file(s) to {to}" in sent.stdout, sent.stderr
    echoed = _mammonode(
        "echo", LOOPBACK, str(pacs.dicom_port), "--aec", pacs.aet, "--tls", "--config", str(toml)
    )
    assert echoed.returncode == 0, echoed.stderr
    assert _mammonode("echo", LOOPBACK, str(pacs.dicom_port), "--aec", pacs.aet).returncode != 0


def _mammonode(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "node.commands.app", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, env=_env())


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MAMMONODE_")}


# -- configuration ----------------------------------------------------------------------------------


def test_destination_tls_forms(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        '[[destinations]]\nae_title = "PACS"\nhost = "pacs.hospital.example"\nport = 2762\ntls = true\n'
        'tls_ca_certificates = "/etc/mammonode/pacs-ca.pem"\ntls_server_name = "pacs.example"\n'
        "tls_check_hostname = false\n\n"
        '[[destinations]]\nae_title = "ARCHIVE"\nhost = "10.0.0.9"\nport = 104\n',
        encoding="utf-8",
    )
    secure, plain = load_config(toml, environ={}).destinations
    assert secure.tls == DestinationTLS(Path("/etc/mammonode/pacs-ca.pem"), "pacs.example", False)
    assert (str(secure), secure.address, str(plain), plain.tls) == (
        "PACS@pacs.hospital.example:2762;tls",
        "PACS@pacs.hospital.example:2762",
        "ARCHIVE@10.0.0.9:104",
        None,
    )
    assert (
        Destination.parse(str(secure)).tls == DestinationTLS()
    )  # the outbox text: TLS, settings from config
    env = {
        "MAMMONODE_DESTINATIONS": "PACS@h:2762;tls;tls_server_name=pacs.example;tls_ca_certificates=/ca.pem, "
        "OTHER@h2:104;tls=false"
    }
    text, off = load_config(toml, environ=env).destinations
    assert text.tls == DestinationTLS(Path("/ca.pem"), "pacs.example", True) and off.tls is None
    assert Destination.parse("PACS@h:2762;tls=yes").tls == DestinationTLS()


def test_allowed_ae_forms(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        '[[allowed_aes]]\nae_title = "MG1"\nhost = "10.1.2.3"\n'
        'certificate_subject = "CN=mg1.example/O=Radiology"\n\n'
        '[[allowed_aes]]\nae_title = "PACS"\n',
        encoding="utf-8",
    )
    bound, anyone = load_config(toml, environ={}).allowed_aes
    assert (str(bound), str(anyone)) == ("MG1@10.1.2.3#CN=mg1.example/O=Radiology", "PACS")
    assert bound.certificate_subject is not None
    assert bound.certificate_subject.attributes == (("CN", "mg1.example"), ("O", "Radiology"))
    env = {"MAMMONODE_ALLOWED_AES": "MG1@10.1.2.3#/commonName=mg1.example/o=Radiology, MG2#CN=mg2, PACS@pacs"}
    again, subject_only, host_only = load_config(toml, environ=env).allowed_aes
    assert again == bound  # long or short attribute names, the leading / optional
    assert (subject_only.host, str(subject_only.certificate_subject)) == (None, "CN=mg2")
    assert (host_only.host, host_only.certificate_subject) == ("pacs", None)
    strings = tmp_path / "strings.toml"
    strings.write_text('allowed_aes = ["MG1#CN=mg1.example", "PACS@10.0.0.9"]\n', encoding="utf-8")
    assert [str(p) for p in load_config(strings, environ={}).allowed_aes] == [
        "MG1#CN=mg1.example",
        "PACS@10.0.0.9",
    ]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MAMMONODE_DESTINATIONS", "PACS@h:104;tls=maybe", "destination tls must be true or false"),
        ("MAMMONODE_DESTINATIONS", "PACS@h:104;tls_server_name=pacs", "tls_server_name need(s) tls = true"),
        ("MAMMONODE_DESTINATIONS", "PACS@h:104;tls;timeout=3", "unknown option(s) timeout"),
        ("MAMMONODE_DESTINATIONS", "PACS@h:104;tls;tls_server_name=a b", "is not a host name"),
        ("MAMMONODE_DESTINATIONS", "PACS@h:104;tls;tls", "each key once"),
        ("MAMMONODE_DESTINATIONS", "PACS@h:104;tls;tls_check_hostname=perhaps", "must be true or false"),
        ("MAMMONODE_ALLOWED_AES", "MG1#", "a certificate subject must follow #"),
        ("MAMMONODE_ALLOWED_AES", "MG1#CN", "must look like CN=name/O=organisation"),
        ("MAMMONODE_ALLOWED_AES", "MG1#CN=a//O=b", "must look like CN=name/O=organisation"),
        ("MAMMONODE_ALLOWED_AES", "MG1#XX=y", "attribute 'XX' is not one of CN, O, OU"),
        ("MAMMONODE_ALLOWED_AES", "MG1@bad host", "is not a host name or address"),
        ("MAMMONODE_ALLOWED_AES", "THIS-AE-TITLE-IS-TOO-LONG", "is not a valid AE title"),
    ],
)
def test_a_bad_tls_form_is_one_line_naming_the_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={variable: value})
    text = str(caught.value)
    assert text.startswith(f"{variable}: ") and message in text and "\n" not in text


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[allowed_aes]]\nae_title = "MG1"\nsubject = "CN=x"\n', "allowed_aes: [[allowed_aes]] entry takes"),
        ('[[allowed_aes]]\nhost = "h"\n', "(ae_title required)"),
        ('[[destinations]]\nae_title = "P"\nhost = "h"\nport = 1\ntls_ca = "x"\n', "unknown key(s) tls_ca"),
        (
            '[[destinations]]\nae_title = "P"\nhost = "h"\nport = 1\ntls = "sometimes"\n',
            "must be true or false",
        ),
    ],
    ids=["allowed-unknown-key", "allowed-without-ae", "destination-unknown-key", "destination-tls-word"],
)
def test_a_bad_tls_table_is_one_line(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_unusable_tls_files_are_one_line(pki: ThrowawayPKI, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n", encoding="utf-8")
    node = {"tls_certificate": pki.node.certificate, "tls_private_key": pki.node.key}
    cases: list[tuple[dict[str, Any], str]] = [
        ({**node, "tls_private_key": tmp_path / "missing.key"}, "tls_private_key"),
        ({**node, "tls_private_key": pki.pacs.key}, "is not the key of tls_certificate"),
        ({**node, "tls_certificate": garbage}, "must be a PEM certificate and its unencrypted PEM key"),
        ({**node, "tls_ca_certificates": garbage}, "is not a PEM certificate bundle"),
        ({**node, "tls_ca_certificates": tmp_path}, "tls_ca_certificates"),
        ({"allowed_aes": (AllowedPeer.parse("MG1#CN=x"),)}, "binds MG1#CN=x to a certificate subject"),
    ]
    for values, message in cases:
        with pytest.raises(ConfigError) as caught:
            tls.check_tls(NodeConfig(**values))
        assert message in str(caught.value) and "\n" not in str(caught.value), values
    assert "cannot read it" in _config_error(lambda: tls.server_context(NodeConfig(**cases[0][0])))
    destination = Destination.parse("PACS@h:104;tls;tls_ca_certificates=/nowhere/ca.pem")
    message = _config_error(lambda: tls.check_tls(NodeConfig(destinations=(destination,))))
    assert message.startswith("destination PACS@h:104;tls: destination tls_ca_certificates /nowhere/ca.pem")


def _config_error(call: Callable[[], object]) -> str:
    with pytest.raises(ConfigError) as caught:
        call()
    return str(caught.value)


def test_contexts_follow_the_bcp195_profile(pki: ThrowawayPKI) -> None:
    config = NodeConfig(
        tls_certificate=pki.node.certificate, tls_private_key=pki.node.key, tls_ca_certificates=pki.ca
    )
    server = tls.server_context(config)
    assert server is not None and server.verify_mode.name == "CERT_OPTIONAL"
    required = tls.server_context(
        NodeConfig(**{**_tls_values(config), "tls_require_client_certificate": True})
    )
    assert required is not None and required.verify_mode.name == "CERT_REQUIRED"
    client = tls.client_context(DestinationTLS(), config)
    assert client.check_hostname and client.verify_mode.name == "CERT_REQUIRED"
    assert not tls.client_context(DestinationTLS(check_hostname=False), config).check_hostname
    for context in (server, client):
        assert context.minimum_version.name == "TLSv1_2"
        suites = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert suites and all(s.startswith("ECDHE-") and "GCM" in s for s in suites)
    assert tls.server_context(NodeConfig()) is None


def _tls_values(config: NodeConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in ("tls_certificate", "tls_private_key", "tls_ca_certificates")}


def test_allow_list_bindings() -> None:
    rules = AllowList.from_peers(
        (
            AllowedPeer.parse(f"MG1@127.0.0.1#{MODALITY_SUBJECT}"),
            AllowedPeer.parse("MG1@10.9.9.9"),
            AllowedPeer.parse("PACS"),
        )
    )
    mg1 = (("CN", "mammo1.example"), ("O", "Radiology"), ("C", "BE"))
    mg2 = (("CN", "mammo2.example"), ("O", "Radiology"))
    assert rules.refusal("MG1", "127.0.0.1", mg1) is None  # extra attributes do not matter
    assert rules.refusal("MG1", "127.0.0.1", mg2) == allowlist.WRONG_CERTIFICATE
    assert rules.refusal("MG1", "127.0.0.1", None) == allowlist.NO_CERTIFICATE
    assert rules.refusal("MG1", "10.9.9.9", None) is None  # the second entry: host only
    assert rules.refusal("MG1", "10.0.0.1", mg1) == allowlist.WRONG_HOST
    assert rules.refusal("PACS", "10.0.0.1", None) is None
    assert rules.refusal("OTHER", "127.0.0.1", mg1) == allowlist.NOT_LISTED


def test_an_outbox_row_follows_its_destinations_tls_setting(tmp_path: Path) -> None:
    from node.dicom.sender import _destination

    secure = Destination.parse("PACS@h:104;tls;tls_server_name=pacs.example")
    config = NodeConfig(data_dir=tmp_path, destinations=(secure,))
    assert _destination(config, "PACS@h:104") is secure  # queued before TLS was turned on
    assert _destination(config, "PACS@h:104;tls") is secure
    assert _destination(NodeConfig(data_dir=tmp_path), "PACS@h:104;tls").tls == DestinationTLS()  # removed
    assert _destination(config, "OTHER@h:104").tls is None
