"""Who is asking: the owner whose work a request touches, and what they bring (their own keys, their
sign-in, their address for the shared-key budget). The pages and the HTTP/MCP API build one per
request; a notebook is the local owner with the environment's settings."""
from __future__ import annotations

from dataclasses import dataclass, field

from services.config import Secret
from services.providers.base import Credentials
from services.storage.owners import LOCAL_OWNER


@dataclass(frozen=True)
class Caller:
    owner: str = LOCAL_OWNER
    cometapi_key: Secret | None = field(default=None, repr=False)  # the visitor's own key, pasted in the page
    hf_token: Secret | None = field(default=None, repr=False)  # the visitor's Hugging Face sign-in
    client_address: str | None = None  # where the request came from (hosted: the shared-key budget per network)

    @property
    def address(self) -> str:
        return self.client_address or ""

    def secret_for(self, credentials: Credentials) -> Secret | None:
        """What this caller brings for a provider that takes ``credentials`` (None: nothing)."""
        secret = {"own_key": self.cometapi_key, "sign_in": self.hf_token}.get(credentials.kind)
        return secret or None
