# A token server for the bearer-token flow, as Docker Hub and GHCR run one: GET /token with
# basic credentials and ?scope=repository:NAME:ACTIONS&service=S answers {"token": JWT}, an ES256
# JWT the CNCF registry verifies against the certificate (x5c header, cert in its
# rootcertbundle). Wrong credentials get 401. Usage: token_server.py KEY CERT PORT USER PASSWORD
# ISSUER. Prints "listening" once it listens.
import base64, http.server, json, os, sys, time, urllib.parse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

key_path, cert_path, port, user, password, issuer = sys.argv[1:7]
key = serialization.load_pem_private_key(open(key_path, "rb").read(), None)
cert = x509.load_pem_x509_certificate(open(cert_path, "rb").read())
cert_der = cert.public_bytes(serialization.Encoding.DER)


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims):
    header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(cert_der).decode()]}
    signing = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    r, s = decode_dss_signature(key.sign(signing.encode(), ec.ECDSA(hashes.SHA256())))
    return signing + "." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query)
        want = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        if url.path != "/token" or self.headers.get("Authorization") != want:
            self.send_response(401)
            self.end_headers()
            return
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        token = jwt({"iss": issuer, "sub": user, "aud": query.get("service", [""])[0],
                     "exp": now + 600, "nbf": now - 10, "iat": now,
                     "jti": os.urandom(8).hex(), "access": access})
        body = json.dumps({"token": token, "expires_in": 600}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


server = http.server.HTTPServer(("127.0.0.1", int(port)), Handler)
print("listening", flush=True)
server.serve_forever()
