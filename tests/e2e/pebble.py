"""A private ACME server for the TLS tests: Let's Encrypt's pebble and pebble-challtestsrv
from Debian 13, as two containers on the stack's own bridge network.

    python -m tests.e2e.pebble up DIR      # prints the directory URL and the CA bundle
    python -m tests.e2e.pebble down

- The image `aiia/pebble:test` is built from `aiia/base:trixie` with Debian's `pebble`
  package (both binaries): nothing comes from anywhere but the Debian archive.
- challtestsrv is pebble's DNS: it answers every A query (eduaiia.com and the other names)
  with the address of the stack's nginx container, so pebble validates http-01 against
  nginx's real port 80, the way Let's Encrypt would reach the server.
- pebble's own HTTPS uses a throwaway CA made here with openssl (`ca.pem` in DIR, given to
  `invoke ssl-renew` as $AIIA_ACME_CA_BUNDLE). Its key never leaves DIR.
- Addresses are the stack subnet's .250 (pebble) and .251 (challtestsrv), derived from
  `load_stack()`: 172.20.0.250 on the real stack, another subnet on an isolated one.
  Both carry the stack's label, so the e2e reset and CI's cleanup remove them too.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from aiia_ops.model import Stack, load_stack

IMAGE = "aiia/pebble:test"
DOCKERFILE = """\
FROM aiia/base:trixie
RUN set -eux; apt-get update; apt-get install -y --no-install-recommends pebble; \\
    rm -rf /var/lib/apt/lists/*; command -v pebble pebble-challtestsrv
USER aiia:aiia
"""
ACME_PORT = 14000
MANAGEMENT_PORT = 15000
DNS_PORT = 8053
CHALLTESTSRV_PORT = 8055
MEMORY = "64m"


def _docker(*args: str, check: bool = True, input: str | None = None, timeout: float = 600):
    proc = subprocess.run(
        ["docker", *args], capture_output=True, text=True, input=input, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} ... failed: {proc.stderr.strip()}")
    return proc


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@dataclass
class Pebble:
    stack: Stack
    workdir: Path
    validity_days: int = 90

    @property
    def pebble_ip(self) -> str:
        return str(self.stack.network.subnet.network_address + 250)

    @property
    def challtestsrv_ip(self) -> str:
        return str(self.stack.network.subnet.network_address + 251)

    @property
    def pebble_name(self) -> str:
        return f"{self.stack.project}_pebble"

    @property
    def challtestsrv_name(self) -> str:
        return f"{self.stack.project}_challtestsrv"

    @property
    def directory(self) -> str:
        return f"https://{self.pebble_ip}:{ACME_PORT}/dir"

    @property
    def ca_bundle(self) -> Path:
        return self.workdir / "ca.pem"

    # --- set up -------------------------------------------------------------------------

    def build_image(self) -> None:
        _docker("build", "--quiet", "--tag", IMAGE, "-", input=DOCKERFILE, timeout=900)

    def make_certificates(self) -> None:
        """A CA and pebble's server certificate for its IP address (test-only keys)."""
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        _openssl(
            *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-days", "2", "-subj", "/CN=aiia test ACME CA"),
            *("-keyout", str(w / "ca-key.pem"), "-out", str(self.ca_bundle)),
        )
        (w / "ext.cnf").write_text(
            f"subjectAltName=IP:{self.pebble_ip},DNS:{self.pebble_name},DNS:localhost\n"
            "extendedKeyUsage=serverAuth\n"
        )
        _openssl(
            *("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-subj", "/CN=pebble", "-keyout", str(w / "key.pem")),
            *("-out", str(w / "server.csr")),
        )
        _openssl(
            *("x509", "-req", "-in", str(w / "server.csr"), "-days", "2"),
            *("-CA", str(self.ca_bundle), "-CAkey", str(w / "ca-key.pem"), "-CAcreateserial"),
            *("-extfile", str(w / "ext.cnf"), "-out", str(w / "cert.pem")),
        )
        (w / "ca-key.pem").unlink()
        (w / "key.pem").chmod(0o644)  # read by pebble as UID 10001; a throwaway test key
        config = {
            "pebble": {
                "listenAddress": f"0.0.0.0:{ACME_PORT}",
                "managementListenAddress": f"0.0.0.0:{MANAGEMENT_PORT}",
                "certificate": "/pebble/cert.pem",
                "privateKey": "/pebble/key.pem",
                "httpPort": 80,  # nginx's port inside the stack network
                "tlsPort": 443,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
                "certificateValidityPeriod": self.validity_days * 86400,
            }
        }
        (w / "pebble-config.json").write_text(json.dumps(config, indent=2))
        w.chmod(0o755)

    def start(self) -> None:
        self.remove()
        net = self.stack.network.name
        nginx_ip = str(self.stack.services.nginx.address)
        common = ["run", "--detach", "--network", net, "--memory", MEMORY, "--cpus", "0.5",
                  "--label", f"org.eduaiia.stack={self.stack.project}",
                  "--label", "org.eduaiia.test=pebble"]  # fmt: skip
        _docker(
            *common, "--name", self.challtestsrv_name, "--ip", self.challtestsrv_ip, IMAGE,
            "pebble-challtestsrv", "-defaultIPv4", nginx_ip, "-defaultIPv6", "",
            "-dns01", f":{DNS_PORT}", "-http01", "", "-https01", "", "-tlsalpn01", "",
            "-doh", "", "-management", f":{CHALLTESTSRV_PORT}",
        )  # fmt: skip
        _docker(
            *common, "--name", self.pebble_name, "--ip", self.pebble_ip,
            "--env", "PEBBLE_VA_NOSLEEP=1", "--env", "PEBBLE_WFE_NONCEREJECT=0",
            "--env", "PEBBLE_AUTHZREUSE=0",
            "--mount", f"type=bind,source={self.workdir},target=/pebble,readonly",
            IMAGE, "pebble", "-config", "/pebble/pebble-config.json",
            "-dnsserver", f"{self.challtestsrv_ip}:{DNS_PORT}",
        )  # fmt: skip
        self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                self.get_json(self.directory)
                return
            except OSError as exc:
                last = exc
                time.sleep(0.3)
        logs = _docker("logs", "--tail", "30", self.pebble_name, check=False)
        raise RuntimeError(f"pebble did not answer at {self.directory}: {last}\n{logs.stderr}")

    # --- use ------------------------------------------------------------------------------

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def get_json(self, url: str):
        with urllib.request.urlopen(url, timeout=5, context=self.context()) as resp:
            return json.loads(resp.read())

    def root_pem(self) -> str:
        """The root of the certificates pebble issues (made afresh at each pebble start)."""
        url = f"https://{self.pebble_ip}:{MANAGEMENT_PORT}/roots/0"
        with urllib.request.urlopen(url, timeout=5, context=self.context()) as resp:
            return resp.read().decode()

    def _challtestsrv(self, path: str, body: dict) -> None:
        url = f"http://{self.challtestsrv_ip}:{CHALLTESTSRV_PORT}{path}"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=5) as resp:
            resp.read()

    def point_name_at(self, host: str, address: str) -> None:
        """Make pebble's DNS answer `address` for `host` (e.g. to fail its challenge)."""
        self._challtestsrv("/add-a", {"host": host.rstrip(".") + ".", "addresses": [address]})

    def reset_name(self, host: str) -> None:
        self._challtestsrv("/clear-a", {"host": host.rstrip(".") + "."})

    # --- tear down ------------------------------------------------------------------------

    def stop_acme_server(self) -> None:
        _docker("stop", "--time", "2", self.pebble_name, check=False)

    def remove(self) -> None:
        _docker("rm", "-f", self.pebble_name, self.challtestsrv_name, check=False)


def main(argv: list[str]) -> int:
    stack = load_stack()
    if argv[:1] == ["up"] and len(argv) == 2:
        pebble = Pebble(stack, Path(argv[1]).resolve())
        pebble.build_image()
        pebble.make_certificates()
        pebble.start()
        print(f"directory: {pebble.directory}\nCA bundle: {pebble.ca_bundle}")
        return 0
    if argv[:1] == ["down"]:
        Pebble(stack, Path("/nonexistent")).remove()
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
