"""The alert sender's TLS verification is really on: a local HTTPS receiver (in-process, loopback, certificates
generated here) is refused when its certificate is self-signed, signed by a CA nobody trusts, or names another
host, and reached when it is signed by the CA the sender was told to trust. No network: the resolver maps the
test host name to 127.0.0.1 and loopback is allowed only because the sender is built with allow_private."""

from __future__ import annotations

import datetime as dt
import http.server
import ssl
import threading
from dataclasses import dataclass, field

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from billing.alert_sender import AlertSender, _PinnedAdapter

HOST = "alerts.rebill.test"


@dataclass
class Pem:
    certificate: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca() -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name("Rebill test CA"))
        .issuer_name(_name("Rebill test CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pem(certificate, key), certificate, key


def make_leaf(host: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None) -> Pem:
    """A server certificate for host, signed by issuer (a CA) or, without one, by its own key (self-signed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (_name(host), key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False
        )
    return _pem(builder.sign(signing_key, hashes.SHA256()), key)


def _pem(certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    return Pem(
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


@dataclass
class Receiver:
    port: int
    bodies: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}/rebill-alerts"


def serve_tls(pem: Pem, tmp_path, name: str):
    """Start a TLS server on a loopback port presenting pem; return (receiver, stop)."""
    certificate_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    certificate_file.write_bytes(pem.certificate)
    key_file.write_bytes(pem.key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate_file, key_file)
    bodies: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):  # keep the test output clean
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):  # a refused handshake is the expected outcome
            pass

    server = Server(("127.0.0.1", 0), Handler)
    # Handshakes happen on accept: a client that rejects the certificate never gets a request through.
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join()

    return Receiver(server.server_address[1], bodies), stop


@pytest.fixture(scope="module")
def ca():
    return make_ca()


@pytest.fixture
def receiver_with(tmp_path):
    stops = []

    def start(pem: Pem, name: str = "leaf") -> Receiver:
        receiver, stop = serve_tls(pem, tmp_path, name)
        stops.append(stop)
        return receiver

    yield start
    for stop in stops:
        stop()


def sender(tmp_path, ca_pem: Pem | None = None) -> AlertSender:
    """The production sender, loopback allowed (the test receiver lives there), trusting ca_pem if given."""
    ca_file = None
    if ca_pem is not None:
        ca_file = tmp_path / "trusted-ca.pem"
        ca_file.write_bytes(ca_pem.certificate)
        ca_file = str(ca_file)
    return AlertSender(
        allow_private=True, resolver=lambda host, port: ["127.0.0.1"] if host == HOST else [], ca_certs=ca_file,
        timeout=5,
    )


BODY, HEADERS = b'{"type": "spend_alert"}', {"Content-Type": "application/json"}


def test_a_self_signed_certificate_is_refused_with_the_default_trust_store(tmp_path, receiver_with):
    receiver = receiver_with(make_leaf(HOST))

    result = sender(tmp_path).post(receiver.url, BODY, HEADERS)

    assert not result.delivered and result.status_code is None
    assert "CERTIFICATE_VERIFY_FAILED" in result.error
    assert receiver.bodies == []


def test_a_certificate_from_an_untrusted_ca_is_refused(tmp_path, receiver_with, ca):
    receiver = receiver_with(make_leaf(HOST, issuer=(ca[1], ca[2])))

    assert "CERTIFICATE_VERIFY_FAILED" in sender(tmp_path).post(receiver.url, BODY, HEADERS).error
    # Trusting some other CA does not help either.
    other_ca_pem = make_ca()[0]
    result = sender(tmp_path, other_ca_pem).post(receiver.url, BODY, HEADERS)
    assert not result.delivered and "CERTIFICATE_VERIFY_FAILED" in result.error
    assert receiver.bodies == []


def test_a_certificate_from_the_trusted_ca_for_another_host_name_is_refused(tmp_path, receiver_with, ca):
    # Signed by the trusted CA, but for a different host name than the URL's: the name check is on.
    receiver = receiver_with(make_leaf("other.rebill.test", issuer=(ca[1], ca[2])))

    result = sender(tmp_path, ca[0]).post(receiver.url, BODY, HEADERS)

    assert not result.delivered and result.status_code is None
    assert "CERTIFICATE_VERIFY_FAILED" in result.error or "hostname" in result.error.lower()
    assert receiver.bodies == []


def test_a_certificate_signed_by_the_trusted_ca_for_the_urls_host_is_accepted(tmp_path, receiver_with, ca):
    receiver = receiver_with(make_leaf(HOST, issuer=(ca[1], ca[2])))

    result = sender(tmp_path, ca[0]).post(receiver.url, BODY, HEADERS)

    assert result.delivered and result.status_code == 200 and result.error is None
    assert receiver.bodies == [BODY]


def test_the_address_of_a_loopback_receiver_is_still_refused_without_allow_private(tmp_path, receiver_with, ca):
    receiver = receiver_with(make_leaf(HOST, issuer=(ca[1], ca[2])))
    strict = AlertSender(resolver=lambda host, port: ["127.0.0.1"], ca_certs=None)

    result = strict.post(receiver.url, BODY, HEADERS)

    assert not result.delivered and "loopback" in result.error
    assert receiver.bodies == []


def test_verification_cannot_be_switched_off_by_requests_verify_false(tmp_path, receiver_with):
    # The adapter ignores requests' `verify`: even verify=False reaches a self-signed receiver only to refuse it.
    receiver = receiver_with(make_leaf(HOST))
    with requests.Session() as session:
        session.trust_env = False
        session.mount("https://", _PinnedAdapter("127.0.0.1"))
        with pytest.raises(requests.exceptions.SSLError):
            session.post(receiver.url, data=BODY, verify=False, timeout=5)
    assert receiver.bodies == []
