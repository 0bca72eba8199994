"""Authentication and transport security of the server: shared-token interceptor, TLS credentials.

The token is a shared secret sent by clients as the metadata ``authorization: Bearer TOKEN``.
Every method needs it except ``grpc.health.v1.Health/*``, which probes (Docker HEALTHCHECK,
kubelet) call without secrets and which reveals nothing but SERVING / NOT_SERVING.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from .config import ServerConfig, is_loopback
from .errors import NotOwner

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
UNAUTHENTICATED_MESSAGE = "missing or wrong token: send metadata 'authorization: Bearer TOKEN'"


async def _deny(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def _denying(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that fails with UNAUTHENTICATED."""
    if handler is None:  # unknown method: do not tell unauthenticated callers it does not exist
        return grpc.unary_unary_rpc_method_handler(_deny)
    ser = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny, **ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny, **ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny, **ser)
    return grpc.unary_unary_rpc_method_handler(_deny, **ser)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless ``authorization`` is ``Bearer TOKEN`` (constant-time compare)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode("ascii")

    def authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                got = value.encode("utf-8") if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(got, self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method.startswith(HEALTH_PREFIX) or self.authorized(
            handler_call_details.invocation_metadata
        ):
            return await continuation(handler_call_details)
        return _denying(await continuation(handler_call_details))


def interceptors(config: ServerConfig) -> list[grpc.aio.ServerInterceptor]:
    return [] if config.auth_token is None else [TokenAuthInterceptor(config.auth_token)]


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{flag}={path!r} cannot be read: {err}") from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the PEM files of the config; None for plaintext."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    cert = _read("tls_cert", config.tls_cert)
    key = _read("tls_key", config.tls_key)
    ca = None if config.tls_client_ca is None else _read("tls_client_ca", config.tls_client_ca)
    check_pem(config)
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def _why(err: ssl.SSLError) -> str:
    return f" ({err.reason.lower().replace('_', ' ')})" if err.reason else ""


def check_pem(config: ServerConfig) -> None:
    """ValueError naming the option when the PEM files are not a certificate chain with its
    private key (and a CA bundle): gRPC only reports "Failed to bind" for them."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_cert or "", config.tls_key)
    except ssl.SSLError as err:
        raise ValueError(f"--tls-cert {config.tls_cert!r} and --tls-key {config.tls_key!r} are "
                         f"not a PEM certificate chain and its private key{_why(err)}") from None
    if config.tls_client_ca is not None:
        try:
            context.load_verify_locations(cafile=config.tls_client_ca)
        except ssl.SSLError as err:
            raise ValueError(f"--tls-client-ca {config.tls_client_ca!r} is not a PEM CA "
                             f"bundle{_why(err)}") from None


def describe(config: ServerConfig) -> str:
    """How callers are authenticated, for the startup log (never the token itself)."""
    parts = []
    if config.tls_client_ca is not None:
        parts.append("client certificates (mutual TLS)")
    if config.auth_token is not None:
        parts.append("bearer token")
    return " + ".join(parts) or "none"


def warn_if_exposed(config: ServerConfig) -> None:
    """A service reachable from other machines without authentication deserves a warning."""
    if not is_loopback(config.host) and config.auth_token is None and config.tls_client_ca is None:
        log.warning(
            "netmoe serve: gRPC bound to %s (not loopback) WITHOUT authentication: any host that "
            "reaches it can register jobs and read plans; set --auth-token-file or "
            "--tls-client-ca", config.host,
        )


class JobOwners:
    """With ``bind_jobs_to_certs`` (mutual TLS): each job belongs to the client certificate that
    registered it, named by its subject common name (the first CN of the subject, as the TLS
    layer verified it). Every rank of a job presents that certificate (one client certificate per
    job, shared by its ranks); any other client gets PERMISSION_DENIED for that job's reports,
    solves, expert calls and unregistration. A certificate whose subject has no common name, or
    an empty one, names nobody: every call it makes is refused (PERMISSION_DENIED saying so), so
    two such certificates can never pass for one owner."""

    def __init__(self) -> None:
        self._owner: dict[str, str] = {}

    @staticmethod
    def identity(context: grpc.aio.ServicerContext) -> str:
        props = context.auth_context()
        names = props.get("x509_common_name") or []
        cn = names[0].decode(errors="replace") if names else ""
        if not cn.strip():  # gRPC reports a subject without a CN as CN=''
            subject = b", ".join(props.get("x509_subject") or []).decode(errors="replace")
            raise NotOwner(
                f"jobs are bound to client certificates (--bind-jobs-to-certs) by their subject "
                f"common name; the call's certificate (subject {subject!r}) has none or a blank "
                f"one (CN={cn!r}): issue it with a CN naming its tenant")
        return cn

    def take(self, job: str, context: grpc.aio.ServicerContext) -> None:
        """After RegisterJob (checked first) created the job: it is the caller's."""
        self._owner.setdefault(job, self.identity(context))

    def check(self, job: str, context: grpc.aio.ServicerContext) -> None:
        """Raises NotOwner unless the caller has an identity and may act for job (held by its
        certificate, or by none yet)."""
        who = self.identity(context)
        owner = self._owner.get(job)
        if owner is not None and who != owner:
            raise NotOwner(f"job {job!r} belongs to client certificate CN={owner!r}, not "
                           f"CN={who!r}")

    def forget(self, job: str) -> None:
        self._owner.pop(job, None)
