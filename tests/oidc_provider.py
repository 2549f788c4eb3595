"""A real OpenID Connect provider on a loopback port, for the single sign-on tests: discovery, an
authorisation endpoint that signs in one configured person at once (a lab's identity provider after its
own login page), the authorisation-code grant with PKCE and client authentication, RS256 ID tokens
signed with a fresh key (``authlib.jose``) and published as a JWKS, and a userinfo endpoint.

Streamlit's ``st.login`` talks to it exactly as to an institution's provider: it reads the discovery
document, sends the browser to ``/authorize``, exchanges the code at ``/token`` and verifies the ID token
against ``/jwks``."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlparse

from authlib.jose import JsonWebKey, jwt


@dataclass
class Person:
    subject: str
    email: str
    name: str
    preferred_username: str


@dataclass
class Provider:
    client_id: str
    client_secret: str
    person: Person
    url: str = ""
    key: object = None
    codes: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)  # (method, path) of every request, for the test to read

    def metadata(self) -> dict:
        return {
            "issuer": self.url,
            "authorization_endpoint": f"{self.url}/authorize",
            "token_endpoint": f"{self.url}/token",
            "userinfo_endpoint": f"{self.url}/userinfo",
            "jwks_uri": f"{self.url}/jwks",
            "end_session_endpoint": f"{self.url}/logout",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "email", "profile"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "code_challenge_methods_supported": ["S256"],
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nonce", "email", "name", "preferred_username"],
        }

    def claims(self) -> dict:
        p = self.person
        return {"sub": p.subject, "email": p.email, "email_verified": True, "name": p.name,
                "preferred_username": p.preferred_username}


def _handler(provider: Provider):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _json(self, body: dict, status: int = 200) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            provider.requests.append(("GET", url.path))
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/.well-known/openid-configuration":
                self._json(provider.metadata())
            elif url.path == "/jwks":
                self._json({"keys": [provider.key.as_dict(is_private=False)]})
            elif url.path == "/authorize":
                if query.get("client_id") != provider.client_id or query.get("response_type") != "code":
                    self._json({"error": "unauthorized_client"}, 400)
                    return
                code = secrets.token_urlsafe(24)
                provider.codes[code] = {"redirect_uri": query.get("redirect_uri"), "nonce": query.get("nonce"),
                                        "challenge": query.get("code_challenge"), "time": time.time()}
                target = query["redirect_uri"] + "?" + urlencode({"code": code, "state": query.get("state", "")})
                self.send_response(302)
                self.send_header("Location", target)
                self.end_headers()
            elif url.path == "/userinfo":
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                if token not in provider.tokens:
                    self._json({"error": "invalid_token"}, 401)
                    return
                self._json(provider.claims())
            elif url.path == "/logout":
                self.send_response(302)
                self.send_header("Location", query.get("post_logout_redirect_uri", "/"))
                self.end_headers()
            else:
                self._json({"error": "not_found"}, 404)

        def do_POST(self) -> None:
            url = urlparse(self.path)
            provider.requests.append(("POST", url.path))
            if url.path != "/token":
                self._json({"error": "not_found"}, 404)
                return
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0)))
                                                    .decode()).items()}
            basic = self.headers.get("Authorization", "")
            if basic.startswith("Basic "):
                client_id, _, client_secret = base64.b64decode(basic[6:]).decode().partition(":")
            else:
                client_id, client_secret = form.get("client_id", ""), form.get("client_secret", "")
            if (client_id, client_secret) != (provider.client_id, provider.client_secret):
                self._json({"error": "invalid_client"}, 401)
                return
            grant = provider.codes.pop(form.get("code", ""), None)
            if form.get("grant_type") != "authorization_code" or grant is None \
                    or grant["redirect_uri"] != form.get("redirect_uri") or time.time() - grant["time"] > 60:
                self._json({"error": "invalid_grant"}, 400)
                return
            if grant["challenge"]:
                verifier = form.get("code_verifier", "").encode()
                expected = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode()
                if expected != grant["challenge"]:
                    self._json({"error": "invalid_grant", "error_description": "PKCE"}, 400)
                    return
            now = int(time.time())
            claims = {"iss": provider.url, "aud": provider.client_id, "iat": now, "exp": now + 300,
                      **provider.claims()}
            if grant["nonce"]:
                claims["nonce"] = grant["nonce"]
            header = {"alg": "RS256", "kid": provider.key.as_dict()["kid"]}
            id_token = jwt.encode(header, claims, provider.key).decode()
            access = secrets.token_urlsafe(24)
            provider.tokens[access] = claims
            self._json({"access_token": access, "token_type": "Bearer", "expires_in": 300, "id_token": id_token,
                        "scope": "openid email profile"})

    return Handler


def start(client_id: str, client_secret: str, person: Person) -> tuple[Provider, ThreadingHTTPServer]:
    """The provider, listening on a free loopback port (stop it with ``server.shutdown()``)."""
    provider = Provider(client_id, client_secret, person)
    provider.key = JsonWebKey.generate_key("RSA", 2048, is_private=True, options={"kid": "test-key"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(provider))
    provider.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return provider, server
