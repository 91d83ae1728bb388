"""Pure logic of `run`, without a runtime or a mount: Entrypoint/Cmd and Env
as docker combines them, users and groups from passwd/group text, -v and -e
parsing, commit -c changes, and paths resolved inside a rootfs."""

from __future__ import annotations

import os
import re

import pytest

from unionfs.container import rootfs, spec, users
from unionfs.container.commands import parse_env, parse_volumes
from unionfs.container.dockerfile import apply_changes
from unionfs.errors import UserError

PASSWD = users.parse_passwd("root:x:0:0:root:/root:/bin/sh\n# comment\nalice:x:1000:1000::/home/alice:/bin/sh\n"
                            "broken line\n")
GROUPS = users.parse_group("root:x:0:\nalice:x:1000:\nstaff:x:50:alice,bob\nwheel:x:10:alice\n")


@pytest.mark.parametrize("config, command, entrypoint, expected", [
    ({"Cmd": ["sh"]}, [], None, ["sh"]),
    ({"Cmd": ["sh"]}, ["ls", "-l"], None, ["ls", "-l"]),
    ({"Entrypoint": ["/init"], "Cmd": ["--serve"]}, [], None, ["/init", "--serve"]),
    ({"Entrypoint": ["/init"], "Cmd": ["--serve"]}, ["--check"], None, ["/init", "--check"]),
    ({"Entrypoint": ["/init"], "Cmd": ["--serve"]}, [], "/bin/echo", ["/bin/echo"]),
    ({"Entrypoint": ["/init"], "Cmd": ["--serve"]}, ["x"], "/bin/echo", ["/bin/echo", "x"]),
    ({"Entrypoint": ["/init"]}, ["x"], "", ["x"]),
])
def test_process_args_as_docker(config, command, entrypoint, expected):
    assert spec.process_args(config, command, entrypoint) == expected


def test_env_defaults_and_overrides():
    env = spec.process_env({"Env": ["A=1", "B=2"]}, ["B=3", "C=4"], "box", "/root", tty=False)
    assert env == ["PATH=" + spec.DEFAULT_PATH, "HOSTNAME=box", "A=1", "B=3", "C=4", "HOME=/root"]
    env = spec.process_env({"Env": ["PATH=/bin", "HOME=/h"]}, [], "box", "/root", tty=True)
    assert env == ["PATH=/bin", "HOSTNAME=box", "HOME=/h", "TERM=xterm"]


@pytest.mark.parametrize("user, expected", [
    ("", (0, 0, (), "/root")),
    ("root", (0, 0, (0,), "/root")),
    ("alice", (1000, 1000, (1000, 50, 10), "/home/alice")),
    ("alice:staff", (1000, 50, (50,), "/home/alice")),
    ("1000", (1000, 1000, (1000, 50, 10), "/home/alice")),
    ("1000:7", (1000, 7, (7,), "/home/alice")),
    ("4242", (4242, 0, (0,), "/")),
])
def test_users_resolve(user, expected):
    u = users.resolve(user, PASSWD, GROUPS)
    assert (u.uid, u.gid, u.additional_gids, u.home) == expected


@pytest.mark.parametrize("user, words", [
    ("nobody", "unable to find user nobody"),
    ("alice:nogroup", "unable to find group nogroup"),
    ("alice:", "expected USER[:GROUP]"),
])
def test_users_refused(user, words):
    with pytest.raises(UserError, match=re.escape(words)):
        users.resolve(user, PASSWD, GROUPS)


def test_non_root_starts_without_effective_capabilities():
    root = spec.process(["x"], [], "/", users.ExecUser(0, 0, (), "/"), False)
    alice = spec.process(["x"], [], "/", users.ExecUser(1000, 1000, (1000,), "/"), False)
    assert root["capabilities"]["effective"] == list(spec.DEFAULT_CAPS)
    assert alice["capabilities"]["effective"] == [] and alice["capabilities"]["bounding"] == list(spec.DEFAULT_CAPS)


def test_rlimits_never_above_the_hard_limit():
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    (nofile,) = spec.rlimits()
    assert nofile["hard"] <= (hard if hard != resource.RLIM_INFINITY else spec.DEFAULT_NOFILE)


def test_parse_volumes(tmp_path):
    (tmp_path / "f").write_text("x")
    binds, anon = parse_volumes([f"{tmp_path}:/mnt/a/../b", f"{tmp_path}/f:/etc/f:ro", "/cache", "/logs:rw"],
                                ["/data", "/mnt/b", "/cache"])
    assert binds == [{"source": str(tmp_path), "destination": "/mnt/b", "readonly": False},
                     {"source": f"{tmp_path}/f", "destination": "/etc/f", "readonly": True}]
    assert anon == ["/cache", "/logs", "/data"]


@pytest.mark.parametrize("spec_, words", [
    ("relative:/x", "named volumes are not supported"),
    ("/no/such/path:/x", "does not exist"),
    ("/tmp:x", "not an absolute path"),
    ("/tmp:/", "cannot be /"),
    ("/tmp:/x:rx", "expected HOST:CTR"),
])
def test_parse_volumes_refused(spec_, words):
    with pytest.raises(UserError, match=words):
        parse_volumes([spec_], [])


def test_parse_env(tmp_path, monkeypatch):
    f = tmp_path / "env"
    f.write_text("# comment\n\nA=1\nFROM_HOST\nUNSET_ONE\n")
    monkeypatch.setenv("FROM_HOST", "h")
    monkeypatch.delenv("UNSET_ONE", raising=False)
    assert parse_env(["A=2", "B="], [str(f)]) == ["A=1", "FROM_HOST=h", "A=2", "B="]
    with pytest.raises(UserError, match="invalid environment variable"):
        parse_env(["=x"], [])


def test_commit_changes():
    cfg = apply_changes({"Env": ["A=1", "B=2"], "Cmd": ["sh"]}, [
        'CMD ["nginx", "-g", "daemon off;"]', "ENTRYPOINT /init --x", "ENV A=9 C=\"a b\"", "ENV D plain text",
        "WORKDIR /srv", "USER www:www", "EXPOSE 80 53/udp", 'VOLUME ["/v1"]', "VOLUME /v2 /v3",
        "LABEL org.x=1 y=two"])
    assert cfg == {
        "Env": ["B=2", "A=9", "C=a b", "D=plain text"], "Cmd": ["nginx", "-g", "daemon off;"],
        "Entrypoint": ["/bin/sh", "-c", "/init --x"], "WorkingDir": "/srv", "User": "www:www",
        "ExposedPorts": {"80/tcp": {}, "53/udp": {}}, "Volumes": {"/v1": {}, "/v2": {}, "/v3": {}},
        "Labels": {"org.x": "1", "y": "two"}}


@pytest.mark.parametrize("change", ["FROM x", "RUN echo", "CMD", "EXPOSE http", "ENV =x"])
def test_commit_changes_refused(change):
    with pytest.raises(UserError):
        apply_changes({}, [change])


def test_paths_resolve_inside_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_text("host secret\n")
    (root / "etc" / "abs").symlink_to(str(outside))
    (root / "etc" / "up").symlink_to("../../../../outside")
    (root / "etc" / "real").write_text("inside\n")
    (root / "etc" / "rel").symlink_to("real")
    assert rootfs.read_file(str(root), "/etc/abs") is None
    assert rootfs.read_file(str(root), "/etc/up") is None
    assert rootfs.read_file(str(root), "/etc/rel") == b"inside\n"
    assert rootfs.read_file(str(root), "/../../etc/real") == b"inside\n"
    assert rootfs.stat_in(str(root), "/etc/rel", follow=False) is None   # a layer: links are not followed
    os.symlink(str(tmp_path), root / "escape")     # a directory link to the host's path
    assert rootfs.read_file(str(root), "/escape/outside") is None


def test_mkdir_all_follows_links_inside_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "abs").symlink_to(str(outside))        # dangling inside the root
    (root / "rel").symlink_to("../../x/y")
    rootfs.mkdir_all(str(root), "/abs/sub")
    rootfs.mkdir_all(str(root), "/rel/z")
    rootfs.mkdir_all(str(root), "/plain/a/b")
    assert os.listdir(outside) == []
    assert (root / str(outside).lstrip("/") / "sub").is_dir()
    assert (root / "x" / "y" / "z").is_dir() and (root / "plain" / "a" / "b").is_dir()
    (root / "loop").symlink_to("loop")
    with pytest.raises(UserError):
        rootfs.mkdir_all(str(root), "/loop/a")
