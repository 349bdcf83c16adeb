"""The Kubernetes examples: valid manifests, parts that agree with each other,
and authproxy configs that pass ``authproxy check-config`` (so they cannot rot).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import kubernetes_validate
import pytest
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from werkzeug.serving import make_server

from .support import TOKEN, Proxy, Upstream, assert_no_secret
from .test_deploy import DOCKERFILE, clean_env, parse_dockerfile, tool

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
APPS = ["kubernetes-dashboard", "headlamp"]
YAML_FILES = sorted(EXAMPLES.rglob("*.yaml"))
#: YAML that is not a Kubernetes manifest; everything else must validate.
NOT_MANIFESTS = {EXAMPLES / "headlamp" / "headlamp-values.yaml"}
#: The oldest Kubernetes the manifests claim (preStop sleep is on by default from
#: 1.30 and GA in 1.34) and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.34.0", kubernetes_validate.latest_version()]
YAMLLINT_CONFIG = "{extends: default, rules: {line-length: {max: 100}}}"


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", [p for p in YAML_FILES if p not in NOT_MANIFESTS], ids=rel)
def test_manifest_validates(path: Path, version: str) -> None:
    found = docs(path)
    assert found, f"{rel(path)} holds no document"
    for doc in found:
        assert doc.get("apiVersion") and doc.get("kind"), f"{rel(path)}: not a manifest"
        kubernetes_validate.validate(doc, version, strict=True)


def test_validation_rejects_a_mistyped_manifest() -> None:
    doc = docs(EXAMPLES / "kubernetes-dashboard" / "deployment.yaml")[0]
    doc["spec"]["template"]["spec"]["containers"][1]["livenessProbe"]["httpGet"]["pth"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_yamllint_passes_every_example(tmp_path: Path) -> None:
    yamllint = tool("yamllint")
    ok = subprocess.run(
        [yamllint, "--strict", "-d", YAMLLINT_CONFIG, str(EXAMPLES)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("---\nkey: value   \nkey: again\n")
    refused = subprocess.run(
        [yamllint, "--strict", "-d", YAMLLINT_CONFIG, str(bad)], capture_output=True, text=True
    )
    assert refused.returncode != 0


# --- the parts of each example agree ---------------------------------------------------


class Example:
    """The top-level manifests of one example directory, by kind."""

    def __init__(self, app: str) -> None:
        self.dir = EXAMPLES / app
        self.objects = [
            d for p in sorted(self.dir.glob("*.yaml")) if p not in NOT_MANIFESTS for d in docs(p)
        ]
        self.deployment = self.one("Deployment")
        self.pod = self.deployment["spec"]["template"]["spec"]
        self.containers = {c["name"]: c for c in self.pod["containers"]}
        self.volumes = {v["name"]: v for v in self.pod["volumes"]}
        self.configmap = self.one("ConfigMap")
        self.toml = tomllib.loads(self.configmap["data"]["authproxy.toml"])

    def one(self, kind: str) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] == kind]
        assert len(found) == 1, f"{self.dir.name}: expected one {kind}, found {len(found)}"
        return found[0]

    def mounted(self, container: str, file: str) -> dict[str, Any]:
        """The volume that holds *file* in *container*, with its sub-path."""
        for mount in self.containers[container].get("volumeMounts", []):
            prefix = mount["mountPath"].rstrip("/") + "/"
            if file.startswith(prefix):
                return {**self.volumes[mount["name"]], "subpath": file[len(prefix) :]}
        raise AssertionError(f"{file} is not on a volume of {container}")


@pytest.fixture(params=APPS)
def example(request: pytest.FixtureRequest) -> Example:
    return Example(request.param)


def step(config: dict[str, Any], use: str) -> dict[str, Any]:
    found = [s for s in config.get("pipeline", []) if s["use"] == use]
    assert len(found) == 1, f"expected one {use} step"
    return found[0]


def test_cloudflared_runs_the_tunnel_from_a_secret_token(example: Example) -> None:
    cf = example.containers["cloudflared"]
    assert re.fullmatch(r"cloudflare/cloudflared:\d{4}\.\d{1,2}\.\d+", cf["image"])
    args = cf["args"]
    assert args[0] == "tunnel" and "run" in args
    token_file = args[args.index("--token-file") + 1]
    assert "secret" in example.mounted("cloudflared", token_file)
    metrics_port = int(args[args.index("--metrics") + 1].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in cf["ports"]}
    probe = cf["readinessProbe"]["httpGet"]
    assert probe["path"] == "/ready" and ports[probe["port"]] == metrics_port
    assert cf["resources"]["requests"]


def test_authproxy_container_matches_its_config(example: Example) -> None:
    ap = example.containers["authproxy"]
    config = example.toml
    assert ap["args"][:2] == ["serve", "--config"]
    volume = example.mounted("authproxy", ap["args"][2])
    assert volume["configMap"]["name"] == example.configmap["metadata"]["name"]
    assert volume["subpath"] in example.configmap["data"]
    ports = {p["name"]: p["containerPort"] for p in ap["ports"]}
    assert int(config["server"]["listen"].rsplit(":", 1)[1]) == ports["http"]
    assert ap["livenessProbe"]["httpGet"]["path"] == config["health"]["live"]
    assert ap["readinessProbe"]["httpGet"]["path"] == config["health"]["ready"]
    assert config["upstream"]["strip_impersonation"] is True
    identity = step(config, "identity")
    assert identity["provider"] == "cloudflare-access"
    assert identity["team_domain"] and identity["audience"]
    # Every ${file:...} the config reads is the projected, kubelet-rotated token.
    files = re.findall(r"\$\{file:([^}]+)\}", json.dumps(step(config, "inject-headers")))
    assert files
    for path in files:
        volume = example.mounted("authproxy", path)
        [source] = volume["projected"]["sources"]
        assert source["serviceAccountToken"]["path"] == volume["subpath"]
    assert example.pod["automountServiceAccountToken"] is False
    uid = parse_dockerfile(DOCKERFILE.read_text())[-1].args("USER")[-1].split(":")[0]
    assert ap["securityContext"]["runAsUser"] == int(uid)
    if ap["securityContext"].get("readOnlyRootFilesystem"):
        assert "emptyDir" in example.mounted("authproxy", "/tmp/gunicorn.ctl")
    assert ap["resources"]["requests"]


def test_shutdown_is_graceful_and_disruptions_are_budgeted(example: Example) -> None:
    server = example.toml["server"]
    ap = example.containers["authproxy"]
    pre_stop = ap["lifecycle"]["preStop"]["sleep"]["seconds"]
    # The pod's grace period covers the preStop pause plus gunicorn's graceful stop.
    assert example.pod["terminationGracePeriodSeconds"] >= pre_stop + server["graceful_timeout"] + 5
    assert server["keepalive"] > 90, "cloudflared keeps idle origin connections for 90 s"
    pdb = example.one("PodDisruptionBudget")
    assert pdb["spec"]["selector"] == example.deployment["spec"]["selector"]
    assert example.deployment["spec"]["replicas"] > pdb["spec"]["maxUnavailable"]


def test_rbac_binds_the_pods_service_account_read_only(example: Example) -> None:
    namespace = example.deployment["metadata"]["namespace"]
    account = example.one("ServiceAccount")
    assert account["metadata"]["name"] == example.pod["serviceAccountName"]
    for obj in example.objects:
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == namespace, obj["metadata"]["name"]
    bindings = [o for o in example.objects if o["kind"] == "ClusterRoleBinding"]
    roles = {o["metadata"]["name"]: o for o in example.objects if o["kind"] == "ClusterRole"}
    assert {b["roleRef"]["name"] for b in bindings} >= {"view"}
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": namespace}
        ]
        role = roles.get(binding["roleRef"]["name"])
        for rule in role["rules"] if role else []:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
            assert "secrets" not in rule["resources"]


def test_variants_differ_from_the_default_only_where_they_say(example: Example) -> None:
    variants = example.dir / "variants"
    for path in sorted(variants.glob("*.yaml")):
        for obj in docs(path):
            if obj["kind"] == "ConfigMap":
                assert obj["metadata"] == example.configmap["metadata"]
                variant = tomllib.loads(obj["data"]["authproxy.toml"])
                for key in ("url", "tls_verify"):
                    variant["upstream"].pop(key, None)
                    example.toml["upstream"].pop(key, None)
                assert variant == example.toml, f"{rel(path)} drifted from config.yaml"
            elif obj["kind"] == "Secret":
                annotation = obj["metadata"]["annotations"]["kubernetes.io/service-account.name"]
                assert annotation == example.pod["serviceAccountName"]
                assert obj["metadata"]["namespace"] == example.deployment["metadata"]["namespace"]


# --- the configs pass check-config --------------------------------------------------------


CONFIGMAPS = sorted(
    p
    for app in APPS
    for p in (EXAMPLES / app).rglob("*.yaml")
    if any(d.get("kind") == "ConfigMap" for d in docs(p))
)


def self_signed(common_name: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@pytest.fixture(scope="module")
def access_keys() -> Iterator[str]:
    """A key endpoint in Cloudflare Access's certs format, on 127.0.0.1."""
    key, cert = self_signed("test.cloudflareaccess.com")
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="test-kid", alg="RS256", use="sig")
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    body = json.dumps(
        {
            "keys": [jwk],
            "public_cert": {"kid": "test-kid", "cert": pem},
            "public_certs": [{"kid": "test-kid", "cert": pem}],
        }
    ).encode()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/cdn-cgi/access/certs"
    server.shutdown()
    server.server_close()


def render(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, f"expected {old!r} in the example config"
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize("path", CONFIGMAPS, ids=rel)
def test_example_config_passes_check_config(path: Path, access_keys: str, tmp_path: Path) -> None:
    [configmap] = [d for d in docs(path) if d["kind"] == "ConfigMap"]
    text = configmap["data"]["authproxy.toml"]
    config = tomllib.loads(text)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    replacements = {
        '"myteam.cloudflareaccess.com"  # EDIT': (
            f'"test.cloudflareaccess.com"  # EDIT\n    certs_url = "{access_keys}"'
        ),
    }
    for found in sorted(set(re.findall(r"\$\{file:([^}]+)\}", text))):
        replacements[found] = str(token)
    tls_verify = config["upstream"].get("tls_verify", True)
    if isinstance(tls_verify, str):
        _key, cert = self_signed("upstream.example")
        ca = tmp_path / "ca.crt"
        ca.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        replacements[f'"{tls_verify}"'] = json.dumps(str(ca))
    rendered = tmp_path / "authproxy.toml"
    rendered.write_text(render(text, replacements))
    result = subprocess.run(
        [sys.executable, "-m", "authproxy.cli", "check-config", "--config", str(rendered)],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert result.stdout.rstrip().endswith("ok")
    for use in (s["use"] for s in config["pipeline"]):
        assert f"  - {use} " in result.stdout, f"{use} missing from the printed stack"
    assert ("NOT VERIFIED" in result.stdout) == (tls_verify is False)
    assert TOKEN not in output


# --- the certificate-pinning recipe in docs/deploy.md ---------------------------------------


def openssl_recipe() -> str:
    """The ``openssl req`` command of docs/deploy.md, continuation lines included."""
    lines = (ROOT / "docs" / "deploy.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("openssl req -x509"))
    command = []
    for line in lines[start:]:
        command.append(line.strip())
        if not line.rstrip().endswith("\\"):
            break
    return "\n".join(command)


@pytest.fixture
def tls_upstream(tmp_path: Path) -> Iterator[tuple[Upstream, Path]]:
    """An upstream serving the certificate the docs' recipe makes, for HOST=localhost."""
    openssl = shutil.which("openssl")
    if openssl is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is missing (Debian package: openssl)")
        pytest.skip("openssl is not installed")
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", openssl_recipe()],
        cwd=tmp_path,
        check=True,
        env={**clean_env(), "HOST": "localhost"},
        capture_output=True,
    )
    upstream = Upstream()
    upstream.server = make_server(
        "127.0.0.1",
        0,
        upstream.app,
        threaded=True,
        ssl_context=(str(tmp_path / "upstream.crt"), str(tmp_path / "upstream.key")),
    )
    upstream.port = upstream.server.server_port
    threading.Thread(target=upstream.server.serve_forever, daemon=True).start()
    yield upstream, tmp_path / "upstream.crt"
    upstream.stop()


def pinned_config(url: str, tls_verify: bool | str) -> dict[str, Any]:
    return {
        "upstream": {"url": url, "tls_verify": tls_verify},
        "pipeline": [{"use": "inject-headers", "set": {"Authorization": f"Bearer {TOKEN}"}}],
    }


def test_pinned_self_signed_certificate_is_trusted_and_nothing_else(
    tls_upstream: tuple[Upstream, Path], start_proxy: Callable[..., Proxy]
) -> None:
    upstream, cert = tls_upstream
    pinned = start_proxy(pinned_config(f"https://localhost:{upstream.port}", str(cert)))
    r = requests.get(pinned.url + "/x", timeout=30)
    assert r.status_code == 200 and r.text == "ok"
    assert upstream.last().header("Authorization") == f"Bearer {TOKEN}"
    seen = len(upstream.seen)
    # The same certificate without the pin, and the pin for a name the URL does
    # not use: the handshake fails, nothing is sent, the client gets a 502.
    for url, verify in (
        (f"https://localhost:{upstream.port}", True),
        (f"https://127.0.0.1:{upstream.port}", str(cert)),
    ):
        proxy = start_proxy(pinned_config(url, verify))
        refused = requests.get(proxy.url + "/x", timeout=30)
        assert refused.status_code == 502
        assert_no_secret(refused)
    assert len(upstream.seen) == seen


# --- the impersonation variant of the dashboard example -------------------------------------


IMPERSONATION = EXAMPLES / "kubernetes-dashboard" / "impersonation"
#: What the account may be given through impersonation: users, groups, extras, uids.
IMPERSONABLE = {("", "users"), ("", "groups"), ("", "uids"), ("authentication.k8s.io", "*")}


def _impersonation_toml() -> dict[str, Any]:
    [configmap] = [d for d in docs(IMPERSONATION / "config.yaml") if d["kind"] == "ConfigMap"]
    return tomllib.loads(configmap["data"]["authproxy.toml"])


def test_impersonation_rbac_lets_the_account_only_impersonate() -> None:
    objects = docs(IMPERSONATION / "rbac.yaml")
    default = Example("kubernetes-dashboard")
    [account] = [o for o in objects if o["kind"] == "ServiceAccount"]
    assert account == default.one("ServiceAccount")
    me = {
        "kind": "ServiceAccount",
        "name": account["metadata"]["name"],
        "namespace": account["metadata"]["namespace"],
    }
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ClusterRole"}
    bindings = [o for o in objects if o["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    mine = [b for b in bindings if me in b["subjects"]]
    assert [b["kind"] for b in mine] == ["ClusterRoleBinding"]
    assert mine[0]["subjects"] == [me]
    rules = roles[mine[0]["roleRef"]["name"]]["rules"]
    for rule in rules:
        assert rule["verbs"] == ["impersonate"], rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                kind = "*" if group == "authentication.k8s.io" else resource
                assert (group, kind) in IMPERSONABLE, rule
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted >= {("", "users"), ("", "groups")}


def test_impersonation_rbac_gives_two_groups_different_rights_in_one_namespace() -> None:
    objects = docs(IMPERSONATION / "rbac.yaml")
    role_bindings = [o for o in objects if o["kind"] == "RoleBinding"]
    rights = {}
    for binding in role_bindings:
        [subject] = binding["subjects"]
        assert subject["kind"] == "Group" and subject["apiGroup"] == "rbac.authorization.k8s.io"
        rights[subject["name"]] = binding["roleRef"]["name"]
    assert sorted(rights.values()) == ["edit", "view"]
    assert len({b["metadata"]["namespace"] for b in role_bindings}) == 1
    # Cluster-wide, the groups get no more than reading namespaces.
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ClusterRole"}
    for binding in (o for o in objects if o["kind"] == "ClusterRoleBinding"):
        if all(s["kind"] == "Group" for s in binding["subjects"]):
            assert {s["name"] for s in binding["subjects"]} <= set(rights)
            for rule in roles[binding["roleRef"]["name"]]["rules"]:
                assert set(rule["verbs"]) <= {"get", "list", "watch"}
                assert rule["resources"] == ["namespaces"]
    # The groups the proxy lets in are the groups the cluster grants something to.
    identity = step(_impersonation_toml(), "identity")
    assert set(identity["allow_groups"]) == set(rights)


def test_impersonation_config_is_the_default_plus_groups_and_the_step() -> None:
    default = Example("kubernetes-dashboard")
    [configmap] = [d for d in docs(IMPERSONATION / "config.yaml") if d["kind"] == "ConfigMap"]
    assert configmap["metadata"] == default.configmap["metadata"]
    variant = _impersonation_toml()
    assert [s["use"] for s in variant["pipeline"]] == [
        "access-log",
        "cross-origin",
        "identity",
        "impersonate",
        "inject-headers",
    ]
    assert step(variant, "cross-origin").get("enabled", True) is True
    assert step(variant, "impersonate")["require_identity"] is True
    identity = dict(step(variant, "identity"))
    assert identity.pop("groups") == "access" and identity.pop("allow_groups")
    assert identity == step(default.toml, "identity")
    assert step(variant, "inject-headers") == step(default.toml, "inject-headers")
    assert step(variant, "access-log") == step(default.toml, "access-log")
    for section in ("server", "upstream", "health"):
        assert variant[section] == default.toml[section], section


def test_impersonation_example_config_acts_as_each_person(
    start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """The example's own config, served by ``authproxy serve``: each person reaches a
    Kubernetes-like upstream as themselves, with their Access groups."""
    from .impersonation import AccessIdentity, ApiServerLike
    from .jwks import AUDIENCE, TEAM_DOMAIN, JwksServer, SigningKey, claims

    key = SigningKey("RSA")
    access = AccessIdentity(
        {
            "alice@example.com": ["dashboard-editors", "all-staff"],
            "carol@example.com": ["all-staff"],
        }
    )
    apiserver = ApiServerLike()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    try:
        with JwksServer([key]) as jwks:
            config = _impersonation_toml()
            del config["server"]["listen"]  # a free loopback port instead
            config["upstream"]["url"] = apiserver.url
            del config["upstream"]["tls_verify"]
            identity = step(config, "identity")
            identity.update(
                team_domain=TEAM_DOMAIN,
                audience=[AUDIENCE],
                certs_url=jwks.url,
                identity_url=access.url,
            )
            inject = step(config, "inject-headers")
            [path] = re.findall(r"\$\{file:([^}]+)\}", inject["set"]["Authorization"])
            inject["set"]["Authorization"] = inject["set"]["Authorization"].replace(
                path, str(token_file)
            )
            proxy = start_proxy(config)

            alice = key.sign(claims())
            r = requests.get(
                proxy.url + "/api/v1/namespaces/team-a/pods",
                headers={"Cf-Access-Jwt-Assertion": alice, "Impersonate-Group": "system:masters"},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            assert r.json()["user"] == "alice@example.com"
            assert r.json()["groups"] == ["dashboard-editors", "all-staff"]
            seen = apiserver.last()
            assert seen.values("Authorization") == [f"Bearer {TOKEN}"]
            assert seen.values("Cf-Access-Jwt-Assertion") == []
            assert_no_secret(r)

            before = len(apiserver.seen)
            carol = key.sign(claims(email="carol@example.com"))
            r = requests.get(proxy.url + "/", headers={"Cf-Access-Jwt-Assertion": carol})
            assert r.status_code == 403, "carol is in no group the cluster grants anything to"
            # A form another site made alice's browser send never arrives.
            r = requests.post(
                proxy.url + "/api/v1/namespaces/team-a/pods",
                headers={"Cf-Access-Jwt-Assertion": alice, "Sec-Fetch-Site": "cross-site"},
                timeout=30,
            )
            assert r.status_code == 403
            assert len(apiserver.seen) == before
    finally:
        access.stop()
        apiserver.stop()
