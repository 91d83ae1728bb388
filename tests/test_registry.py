"""push, pull, login, logout and tag against real registries (Debian's
docker-registry, distribution 2.8): plain http, https + htpasswd Basic auth,
and https + bearer tokens; read back and written by skopeo and umoci."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from image_helpers import (D, F, L, apply_layers, config_for, force_unmount, fuse_available, layer_tar, sha,
                           tree)
from registry_helpers import (PASSWORD, REGISTRY_BIN, USER, FaultyProxy, free_port, image_manifest, index_of, oci_layout,
                              start_registry, store_snapshot)

SKOPEO = shutil.which("skopeo")
UMOCI = shutil.which("umoci")
IS_ROOT = os.geteuid() == 0
requires_fuse = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse")

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not REGISTRY_BIN, reason="needs docker-registry (Makefile APT_PKGS installs it)"),
    pytest.mark.skipif(not (SKOPEO and UMOCI), reason="needs skopeo and umoci (Makefile APT_PKGS installs them)"),
]

# A small image: a base, a layer that changes and deletes, each compressed differently.
TARS = [
    layer_tar(D("etc"), F("etc/motd", b"hello\n"), F("etc/hosts", b"127.0.0.1 localhost\n"),
              D("usr"), D("usr/bin"), F("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755),
              L("bin", "usr/bin"), F("srv", os.urandom(300_000))),
    layer_tar(D("etc"), F("etc/motd", b"changed\n", mode=0o600), F("etc/.wh.hosts"),
              D("var", mode=0o700), F("var/data", os.urandom(100_000), uid=1000, gid=1000)),
]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    reg = start_registry("plain", tmp_path_factory.mktemp("reg-plain"))
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def basic(tmp_path_factory):
    reg = start_registry("basic", tmp_path_factory.mktemp("reg-basic"))
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def token(tmp_path_factory):
    reg = start_registry("token", tmp_path_factory.mktemp("reg-token"))
    yield reg
    reg.stop()


class Env:
    """A user's world: their auth file, stores and scratch dir under tmp_path."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.auth_file = tmp / "run" / "containers" / "auth.json"
        (tmp / "home").mkdir()
        (tmp / "run").mkdir(mode=0o700)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self.env.update(HOME=str(tmp / "home"), XDG_RUNTIME_DIR=str(tmp / "run"), UNIONFS_STORE=str(tmp / "store"))

    def run(self, *args, store: Path | None = None, input=None, timeout=120):
        env = dict(self.env)
        if store is not None:
            env["UNIONFS_STORE"] = str(store)
        return subprocess.run([sys.executable, "-m", "unionfs", *map(str, args)], capture_output=True,
                              text=True, env=env, input=input, timeout=timeout)

    def ok(self, *args, **kw) -> str:
        r = self.run(*args, **kw)
        assert r.returncode == 0, f"unionfs {' '.join(map(str, args))}: {r.stderr}"
        return r.stdout

    def fails(self, *args, **kw) -> str:
        """Run, expect failure with one error line (after any progress
        lines) and no traceback; return that line."""
        r = self.run(*args, **kw)
        assert r.returncode != 0, f"unionfs {' '.join(map(str, args))} succeeded: {r.stdout}"
        lines = r.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("unionfs: ")]
        assert errors == lines[-1:] and "Traceback" not in r.stderr, r.stderr
        return lines[-1]

    def tool(self, *cmd, check=True):
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=self.env, timeout=120)
        if check:
            assert r.returncode == 0, f"{' '.join(map(str, cmd))}: {r.stderr}"
        return r

    def skopeo(self, *args, check=True):
        return self.tool(SKOPEO, "--insecure-policy", *args, check=check)

    def load(self, tars=TARS, compressions=("gzip", "none"), name="app:1", store=None, config=None):
        """Load an image (OCI layout) into a store; return its image ID."""
        layout = self.tmp / f"layout-{name.replace(':', '-').replace('/', '-')}"
        config = config or config_for(tars)
        oci_layout(layout, "x", image_manifest(layout, list(zip(tars, compressions)), config))
        self.ok("image", "load", "--tag", name, layout, store=store)
        return inspect(self, name, store)


def inspect(env: Env, name: str, store=None) -> dict:
    return json.loads(env.ok("image", "inspect", name, store=store))[0]


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def unpacked(env: Env, layout_ref: str, dest: Path) -> dict:
    env.tool(UMOCI, "unpack", *([] if IS_ROOT else ["--rootless"]), "--image", layout_ref, dest)
    return tree(str(dest / "rootfs"), owners=IS_ROOT)


@pytest.fixture
def mounts():
    """Mount points to unmount at teardown, whatever the test did."""
    done = []
    yield done
    for mnt in done:
        force_unmount(str(mnt))


def mounted_tree(env: Env, image: str, mounts: list, store=None) -> dict:
    mnt = env.tmp / f"mnt-{len(mounts)}"
    mnt.mkdir()
    env.ok("image", "mount", image, mnt, store=store)
    mounts.append(mnt)
    return tree(str(mnt), owners=IS_ROOT, xattrs=False)


def reference_tree(tmp: Path, tars) -> dict:
    ref = tmp / "reference"
    ref.mkdir(exist_ok=True)
    apply_layers(tars, str(ref))
    return tree(str(ref), owners=IS_ROOT, xattrs=False)


# -- round trips -----------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_push_then_skopeo_reads_it_back_identical(env, plain, fmt):
    image = env.load()
    dest = f"{plain.host}/roundtrip/{fmt}:v1"
    out = env.ok("push", "--format", fmt, *plain.tls_args, "app:1", dest)
    digest = out.strip().splitlines()[-1]
    raw = env.skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{dest}").stdout
    manifest = json.loads(raw)
    assert sha(raw.encode()) == digest
    assert manifest["mediaType"] == {"oci": "application/vnd.oci.image.manifest.v1+json",
                                     "docker": "application/vnd.docker.distribution.manifest.v2+json"}[fmt]
    assert manifest["config"]["digest"] == image["Id"]
    assert [x["digest"] for x in manifest["layers"]] == [x["digest"] for x in image["Layers"]]
    env.skopeo("copy", "-q", "--src-tls-verify=false", f"docker://{dest}", f"oci:{env.tmp / 'back'}:v1")
    assert unpacked(env, f"{env.tmp / 'back'}:v1", env.tmp / "bundle") == reference_tree(env.tmp, TARS)
    # and unionfs reads its own manifest back (the docker one names an uncompressed layer .diff.tar)
    assert env.ok("pull", *plain.tls_args, dest, store=env.tmp / "other").strip() == image["Id"]


@requires_fuse
def test_skopeo_pushes_unionfs_pulls_identical(env, plain, mounts):
    layout = env.tmp / "layout"
    config = config_for(TARS)
    oci_layout(layout, "v1", image_manifest(layout, list(zip(TARS, ("zstd", "gzip"))), config))
    dest = f"{plain.host}/from-skopeo/app:v1"
    env.skopeo("copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{dest}")
    out = env.ok("pull", *plain.tls_args, dest)
    image = inspect(env, dest)
    assert out.strip().splitlines()[-1] == image["Id"] == sha(config)
    blobs = json.loads((layout / "blobs/sha256" / json.loads((layout / "index.json").read_text())
                        ["manifests"][0]["digest"][7:]).read_text())["layers"]
    assert [x["digest"] for x in image["Layers"]] == [b["digest"] for b in blobs]
    # umoci cannot unpack zstd layers: read the pulled image through a mount.
    assert mounted_tree(env, dest, mounts) == reference_tree(env.tmp, TARS)


def test_image_id_and_layers_survive_push_and_pull_and_a_second_push_uploads_nothing(env, plain):
    image = env.load()
    dest = f"{plain.host}/ids/app:v1"
    digest = env.ok("push", *plain.tls_args, "app:1", dest).strip()
    env.ok("pull", *plain.tls_args, dest, store=env.tmp / "other")
    pulled = inspect(env, dest, store=env.tmp / "other")
    assert pulled["Id"] == image["Id"]
    assert pulled["Layers"] == image["Layers"]
    assert pulled["RootFS"] == image["RootFS"]
    # by the digest push printed
    out = env.ok("pull", *plain.tls_args, f"{plain.host}/ids/app@{digest}", store=env.tmp / "by-digest")
    assert out.strip() == image["Id"]
    wrong = "sha256:" + "0" * 64
    assert "not found" in env.fails("pull", *plain.tls_args, f"{plain.host}/ids/app@{wrong}")

    uploads, puts = plain.requests("POST", "/v2/ids/app/blobs/uploads/"), plain.requests("PUT", "/v2/ids/app/blobs/")
    r = env.run("push", *plain.tls_args, "app:1", dest)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("already exists") == 3          # two layers and the config
    assert plain.requests("POST", "/v2/ids/app/blobs/uploads/") == uploads
    assert plain.requests("PUT", "/v2/ids/app/blobs/") == puts

    # Another repository of the same registry: the blobs are mounted, not sent.
    r = env.run("push", *plain.tls_args, "app:1", f"{plain.host}/ids/copy:v1")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("mounted from ids/app") == 3
    assert plain.requests("PUT", "/v2/ids/copy/blobs/") == 0


def test_pull_skips_layers_the_store_has(env, plain):
    env.load()
    dest = f"{plain.host}/skip/app:v1"
    env.ok("push", *plain.tls_args, "app:1", dest)
    gets = plain.requests("GET", "/v2/skip/app/blobs/")
    r = env.run("pull", *plain.tls_args, dest)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("already in the store") == 2
    assert plain.requests("GET", "/v2/skip/app/blobs/") == gets + 1     # the config only


def host_platform() -> tuple[str, str | None]:
    from unionfs.registry.pull import host
    h = host()
    return h.architecture, h.variant


def test_a_two_platform_index_pulls_the_host_platform_or_the_one_asked(env, plain):
    arch, _ = host_platform()
    other = "s390x" if arch != "s390x" else "amd64"
    layout = env.tmp / "multi"
    tars_host = [layer_tar(F("which", f"{arch}\n".encode()))]
    tars_other = [layer_tar(F("which", f"{other}\n".encode()))]
    cfg_host = config_for(tars_host, architecture=arch)
    cfg_other = config_for(tars_other, architecture=other)
    entries = [(image_manifest(layout, [(tars_other[0], "gzip")], cfg_other), {"os": "linux", "architecture": other}),
               (image_manifest(layout, [(tars_host[0], "gzip")], cfg_host), {"os": "linux", "architecture": arch})]
    oci_layout(layout, "multi", index_of(layout, entries))
    dest = f"{plain.host}/multi/app:v1"
    env.skopeo("copy", "-q", "--all", "--dest-tls-verify=false", f"oci:{layout}:multi", f"docker://{dest}")

    assert env.ok("pull", *plain.tls_args, dest).strip().splitlines()[-1] == sha(cfg_host)
    out = env.ok("pull", *plain.tls_args, "--platform", f"linux/{other}", dest, store=env.tmp / "s2")
    assert out.strip().splitlines()[-1] == sha(cfg_other)
    assert inspect(env, dest, store=env.tmp / "s2")["Architecture"] == other
    line = env.fails("pull", *plain.tls_args, "--platform", "linux/mips64le", dest)
    assert "no image for linux/mips64le" in line and f"linux/{other}" in line and f"linux/{arch}" in line


# -- failures leave the store as it was ----------------------------------------

def test_a_corrupted_blob_on_the_registry_is_refused_and_the_store_is_unchanged(env, plain):
    # Blobs of its own: the registry shares blobs between repositories.
    image = env.load(tars=[layer_tar(F("own", os.urandom(200_000)))], compressions=("gzip",))
    dest = f"{plain.host}/corrupt/app:v1"
    env.ok("push", *plain.tls_args, "app:1", dest)
    store = env.tmp / "other"
    env.load(tars=[layer_tar(F("keep", b"me"))], compressions=("gzip",), name="keep:1", store=store)
    before = store_snapshot(store)
    layer = image["Layers"][0]["digest"]
    blob = plain.blob_file(layer)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    line = env.fails("pull", *plain.tls_args, dest, store=store)
    assert "digest mismatch" in line or "cannot read the blob" in line, line
    assert layer[:19] in line
    assert store_snapshot(store) == before


def test_a_blob_recompressed_on_the_registry_is_refused_by_its_digest(env, plain):
    """Same tar, other gzip bytes (the header's mtime), same size: only the
    blob digest check can tell; the diff_id and the size still match."""
    image = env.load(tars=[layer_tar(F("own", os.urandom(50_000)))], compressions=("gzip",))
    dest = f"{plain.host}/recompressed/app:v1"
    env.ok("push", *plain.tls_args, "app:1", dest)
    layer = image["Layers"][0]["digest"]
    blob = plain.blob_file(layer)
    data = bytearray(blob.read_bytes())
    assert data[:2] == b"\x1f\x8b"
    data[4:8] = (int.from_bytes(data[4:8], "little") ^ 1).to_bytes(4, "little")   # MTIME
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    store = env.tmp / "other"
    line = env.fails("pull", *plain.tls_args, dest, store=store)
    assert "digest mismatch" in line and layer[:19] in line, line
    assert not (store / "images").exists() or not os.listdir(store / "images")

def test_errors_a_user_meets_are_one_line(env, plain, basic):
    env.load()
    port = free_port()
    assert "connection refused" in env.fails("pull", "--tls-verify=false", f"127.0.0.1:{port}/x/y:1")
    assert "unknown host" in env.fails("pull", "no-such-registry.invalid/x/y:1")
    assert "does not speak https" in env.fails("pull", f"{plain.host}/x/y:1")
    assert "not trusted" in env.fails("pull", f"{basic.host}/x/y:1")
    # --tls-verify=false gets past the certificate (to the missing credentials)
    assert "unauthorized" in env.fails("pull", "--tls-verify=false", f"{basic.host}/x/y:1")
    assert "not found" in env.fails("pull", *plain.tls_args, f"{plain.host}/nothing/here:v1")
    assert "name the registry" in env.fails("push", "app:1", "just/a/repo")
    assert "no such image" in env.fails("push", *plain.tls_args, "missing:1", f"{plain.host}/x/y:1")
    assert "--platform" in env.fails("pull", "--platform", "linux", f"{plain.host}/x/y:1")


# -- credentials -----------------------------------------------------------------

def test_basic_auth_login_logout_and_skopeo_sharing_the_auth_file(env, basic):
    env.load()
    dest = f"{basic.host}/private/app:v1"
    line = env.fails("push", *basic.tls_args, "app:1", dest)
    assert "unauthorized" in line and "unionfs login" in line
    assert "wrong username or password" in env.fails("login", *basic.tls_args, "-u", USER, "--password-stdin",
                                                     basic.host, input="nope\n")
    assert not env.auth_file.exists()

    r = env.run("login", *basic.tls_args, "-u", USER, "--password-stdin", basic.host, input=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    assert stat.S_IMODE(env.auth_file.stat().st_mode) == 0o600
    assert basic.host in json.loads(env.auth_file.read_text())["auths"]

    env.ok("push", *basic.tls_args, "app:1", dest)
    env.ok("pull", *basic.tls_args, dest, store=env.tmp / "other")
    # skopeo finds the credentials unionfs wrote ($XDG_RUNTIME_DIR/containers/auth.json).
    raw = env.skopeo("inspect", "--raw", "--cert-dir", basic.cert_dir, f"docker://{dest}").stdout
    assert json.loads(raw)["config"]["digest"] == inspect(env, "app:1")["Id"]

    env.ok("logout", basic.host)
    assert basic.host not in json.loads(env.auth_file.read_text())["auths"]
    assert "unauthorized" in env.fails("pull", *basic.tls_args, dest, store=env.tmp / "third")
    assert "not logged in" in env.fails("logout", basic.host)
    assert not (env.tmp / "third" / "images").exists() or not os.listdir(env.tmp / "third" / "images")


def test_credentials_skopeo_wrote_are_used_by_unionfs(env, basic):
    env.load()
    env.skopeo("login", "--cert-dir", basic.cert_dir, "-u", USER, "-p", PASSWORD, basic.host)
    env.ok("push", *basic.tls_args, "app:1", f"{basic.host}/by-skopeo/app:v1")


def test_bearer_tokens_are_scoped_reused_and_refused_without_login(env, token):
    env.load()
    dest = f"{token.host}/tok/app:v1"
    line = env.fails("push", *token.tls_args, "app:1", dest)
    assert "unauthorized" in line
    assert "wrong username or password" in env.fails("login", *token.tls_args, "-u", USER, "-p", "bad", token.host)
    env.ok("login", *token.tls_args, "-u", USER, "--password-stdin", token.host, input=PASSWORD)

    token.issuer.requests.clear()
    env.ok("push", *token.tls_args, "app:1", dest)
    asked = [r for r in token.issuer.requests if r["user"] == USER]
    assert asked == [{"user": USER, "scopes": ["repository:tok/app:pull,push"], "service": "unionfs-test-registry"}]

    token.issuer.requests.clear()
    env.ok("pull", *token.tls_args, dest, store=env.tmp / "other")
    assert [r["scopes"] for r in token.issuer.requests] == [["repository:tok/app:pull"]]

    # A mount from another repository needs a token for both.
    token.issuer.requests.clear()
    r = env.run("push", *token.tls_args, "app:1", f"{token.host}/tok/copy:v1")
    assert r.returncode == 0 and r.stderr.count("mounted from tok/app") == 3, r.stderr
    assert ["repository:tok/copy:pull,push", "repository:tok/app:pull"] in [x["scopes"] for x in token.issuer.requests]
    assert inspect(env, dest, store=env.tmp / "other")["Id"] == inspect(env, "app:1")["Id"]

    env.ok("logout", token.host)
    assert "unauthorized" in env.fails("pull", *token.tls_args, dest, store=env.tmp / "third")


def test_tag_and_image_tag(env, plain):
    image = env.load()
    env.ok("tag", "app:1", f"{plain.host}/tagged/app")
    env.ok("image", "tag", "app:1", "other:2")
    assert inspect(env, f"{plain.host}/tagged/app:latest")["Id"] == image["Id"]
    assert sorted(inspect(env, "other:2")["RepoTags"]) == sorted(["app:1", "other:2", f"{plain.host}/tagged/app:latest"])
    env.ok("push", *plain.tls_args, f"{plain.host}/tagged/app")           # the destination is the name
    assert "no such image" in env.fails("tag", "nothing:1", "x:1")


@pytest.fixture
def faulty(plain):
    proxies = []

    def make(digest, mode):
        proxies.append(FaultyProxy(plain, digest, mode))
        return proxies[-1]
    yield make
    for p in proxies:
        p.stop()


def _pushed_with_a_store(env, plain, repo):
    """Push the test image to `repo`; make another store holding one image."""
    image = env.load()
    env.ok("push", *plain.tls_args, "app:1", f"{plain.host}/{repo}:v1")
    store = env.tmp / "other"
    env.load(tars=[layer_tar(F("keep", b"me"))], compressions=("gzip",), name="keep:1", store=store)
    return image["Layers"][0]["digest"], store


def test_a_connection_lost_mid_layer_is_retried_then_fails_with_the_store_unchanged(env, plain, faulty):
    layer, store = _pushed_with_a_store(env, plain, "dropped/app")
    proxy = faulty(layer, "drop")
    before = store_snapshot(store)
    line = env.fails("pull", "--tls-verify=false", f"{proxy.host}/dropped/app:v1", store=store)
    assert "connection lost" in line and layer[:19] in line, line
    assert proxy.hits == 3                                  # tried three times
    assert store_snapshot(store) == before


def test_ctrl_c_during_a_pull_leaves_the_store_unchanged(env, plain, faulty):
    layer, store = _pushed_with_a_store(env, plain, "interrupted/app")
    proxy = faulty(layer, "stall")
    before = store_snapshot(store)
    p = subprocess.Popen([sys.executable, "-m", "unionfs", "pull", "--tls-verify=false",
                          f"{proxy.host}/interrupted/app:v1"], env=dict(env.env, UNIONFS_STORE=str(store)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proxy.stalled.wait(60), "the pull never reached the layer"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "unionfs: interrupted" and "Traceback" not in err
    assert store_snapshot(store) == before


@requires_fuse
def test_migration_commit_push_then_pull_elsewhere_shows_the_same_files(env, plain, mounts):
    """One machine changes a container and commits it, pushes; another pulls
    and mounts it. (`run` replaces the mounts once it exists.)"""
    env.load()
    mnt = env.tmp / "mnt-a"
    mnt.mkdir()
    env.ok("image", "mount", "--name", "work", "app:1", mnt)
    mounts.append(mnt)
    (mnt / "etc/motd").write_text("migrated\n")
    (mnt / "srv").unlink()
    os.makedirs(mnt / "home/user")
    (mnt / "home/user/notes").write_bytes(os.urandom(50_000))
    dest = f"{plain.host}/migrate/app:v2"
    env.ok("commit", "work", dest, "-m", "changes made on machine A")
    before = tree(str(mnt), owners=IS_ROOT, xattrs=False)
    env.ok("push", *plain.tls_args, dest)

    other = env.tmp / "machine-b"
    env.ok("pull", *plain.tls_args, dest, store=other)
    assert mounted_tree(env, dest, mounts, store=other) == before
    assert inspect(env, dest, store=other)["Id"] == inspect(env, dest)["Id"]


SNAPSHOT = 'import json, sys; sys.path.insert(0, "{tests}"); from registry_helpers import store_snapshot; ' \
           'from pathlib import Path; print(json.dumps(store_snapshot(Path("{store}"))))'


@pytest.mark.skipif(not IS_ROOT or not shutil.which("unshare"), reason="needs root (a tmpfs in a private mount namespace)")
def test_a_full_disk_fails_with_one_line_and_leaves_the_store_unchanged(env, plain):
    env.load()
    dest = f"{plain.host}/full/app:v1"
    env.ok("push", *plain.tls_args, "app:1", dest)
    layout = env.tmp / "small-layout"
    oci_layout(layout, "x", image_manifest(layout, [(layer_tar(F("keep", b"me")), "gzip")],
                                           config_for([layer_tar(F("keep", b"me"))])))
    store = env.tmp / "small-store"
    store.mkdir()
    py, tests = sys.executable, str(Path(__file__).parent)
    snap = SNAPSHOT.format(tests=tests, store=str(store))
    # The image needs ~800 KB in the store; the tmpfs has 600 KB.
    script = f"""
set -e
mount --make-rprivate /
mount -t tmpfs -o size=600k tmpfs {store}
{py} -m unionfs image load -q --store {store} --tag keep:1 {layout}
{py} -c '{snap}' > {env.tmp}/before.json
set +e
{py} -m unionfs pull --store {store} --tls-verify=false {dest} 2> {env.tmp}/err
echo $? > {env.tmp}/rc
{py} -c '{snap}' > {env.tmp}/after.json
"""
    env.tool("unshare", "--mount", "sh", "-c", script)
    err = (env.tmp / "err").read_text().strip().splitlines()
    assert int((env.tmp / "rc").read_text()) != 0
    assert err[-1].startswith("unionfs: ") and "No space left on device" in err[-1], err
    assert "Traceback" not in "\n".join(err)
    before = json.loads((env.tmp / "before.json").read_text())
    assert before and json.loads((env.tmp / "after.json").read_text()) == before


def test_a_transient_failure_of_an_upload_is_retried(env, plain, faulty):
    image = env.load(tars=[layer_tar(F("retry", os.urandom(100_000)))], compressions=("gzip",))
    proxy = faulty(None, "503-once")
    digest = env.ok("push", "--tls-verify=false", "app:1", f"{proxy.host}/retry/app:v1").strip()
    assert proxy.hits == 1
    raw = env.skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{plain.host}/retry/app:v1").stdout
    assert sha(raw.encode()) == digest
    assert json.loads(raw)["config"]["digest"] == image["Id"]
