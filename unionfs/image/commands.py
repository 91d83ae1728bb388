"""The image-related subcommands: `image load|ls|inspect|history|rm|mount|save|tag`,
`ps`, `rm`, `diff`, `commit`, `tag`. `register(subparsers)` adds them to the
top-level argparse subparsers; each sets `func(args) -> int`."""

from __future__ import annotations

import argparse
import calendar
import json
import os
import re
import sys
import time

from unionfs.errors import EXIT_OK, UserError
from unionfs.image import oci
from unionfs.image.progress import Progress
from unionfs.image.store import Image, Store, default_store_path, mounted_paths, name_candidates

FORMATS = ("docker", "oci")
# The mount flags `image mount -o` takes (the layers come from the image).
IMAGE_MOUNT_FLAGS = ("ro", "rw", "nodev", "dev", "nosuid", "suid", "noexec", "exec")


def register(subparsers):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="DIR",
                        help="image store (default: $UNIONFS_STORE, else /var/lib/unionfs as root, "
                             "~/.local/share/unionfs otherwise)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress or informational output")

    image = subparsers.add_parser("image", help="load, list, inspect, mount and save images")
    image_sub = image.add_subparsers(dest="image_command", metavar="COMMAND")
    image_sub.required = True

    p = image_sub.add_parser("load", parents=[common], help="load a docker-archive or OCI layout (dir or tar)")
    p.add_argument("path", metavar="FILE|DIR")
    p.add_argument("--tag", "-t", help="name the loaded image NAME[:TAG] (one image only)")
    p.set_defaults(func=cmd_load)

    p = image_sub.add_parser("ls", parents=[common], help="list images")
    p.set_defaults(func=cmd_ls)

    p = image_sub.add_parser("inspect", parents=[common], help="show an image's config as JSON")
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=cmd_inspect)

    p = image_sub.add_parser("history", parents=[common], help="list an image's layers, newest first")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--no-trunc", action="store_true", help="do not shorten CREATED BY")
    p.set_defaults(func=cmd_history)

    p = image_sub.add_parser("rm", parents=[common], help="remove images (and layers nothing uses any more)")
    p.add_argument("images", metavar="IMAGE", nargs="+")
    p.set_defaults(func=cmd_image_rm)

    p = image_sub.add_parser("mount", parents=[common], help="mount an image as a container's rootfs")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--name", help="container name (an existing container of that image is remounted)")
    p.add_argument("-o", dest="options", action="append", metavar="OPTS",
                   help=f"mount flags, comma-separated: {', '.join(IMAGE_MOUNT_FLAGS)} "
                        "(as root the default is suid,dev,exec,rw, as kernel overlayfs)")
    p.set_defaults(func=cmd_image_mount)

    p = image_sub.add_parser("save", parents=[common], help="write an image archive")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--format", choices=FORMATS, default="docker",
                   help="docker: docker-archive (docker load, skopeo docker-archive:); "
                        "oci: OCI image layout as a tar (skopeo oci-archive:, umoci)")
    p.set_defaults(func=cmd_save)

    for parent in (image_sub, subparsers):
        p = parent.add_parser("tag", parents=[common], help="give an image another name")
        p.add_argument("image", metavar="IMAGE")
        p.add_argument("name", metavar="NEWNAME[:TAG]")
        p.set_defaults(func=cmd_tag)

    p = subparsers.add_parser("ps", parents=[common], help="list containers")
    p.add_argument("-a", "--all", action="store_true", help="also those not running or mounted")
    p.set_defaults(func=cmd_ps)

    p = subparsers.add_parser("rm", parents=[common], help="remove containers (their upper and work dirs)")
    p.add_argument("names", metavar="NAME", nargs="+")
    p.add_argument("-f", "--force", action="store_true", help="stop a running or unmount a mounted container first")
    p.set_defaults(func=cmd_rm)

    p = subparsers.add_parser("diff", parents=[common], help="list changes (A/C/D) of a container")
    p.add_argument("target", metavar="NAME|MOUNTPOINT|UPPERDIR")
    p.add_argument("--lowerdir", metavar="TOP:...:BOTTOM",
                   help="lower layers of a plain UPPERDIR (to tell C from A)")
    p.set_defaults(func=cmd_diff)

    p = subparsers.add_parser("commit", parents=[common], help="store a container's changes as a new image")
    p.add_argument("container", metavar="NAME|MOUNTPOINT")
    p.add_argument("image", metavar="IMAGE[:TAG]")
    p.add_argument("-m", "--message", help="history entry (created_by) for the new layer")
    p.add_argument("-c", "--change", action="append", default=[], metavar="INSTRUCTION",
                   help="Dockerfile-style config change: CMD ENTRYPOINT ENV WORKDIR USER EXPOSE VOLUME LABEL")
    p.add_argument("-p", "--pause", nargs="?", const="true", default="true", choices=("true", "false"),
                   help="freeze a running container during the commit (default true; --pause=false)")
    p.set_defaults(func=cmd_commit)


# -- helpers -------------------------------------------------------------------

def _store(args) -> Store:
    return Store(args.store or default_store_path())


def _progress(args) -> Progress:
    return Progress(quiet=args.quiet)


def _info(args, message: str):
    if not args.quiet:
        print(message, flush=True)


def normalize_name(name: str) -> str:
    """NAME -> NAME:latest; NAME:TAG as is (a ':' before the last '/' is a port)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*", name):
        raise UserError(f"invalid image name {name!r}")
    return oci.with_default_tag(name)


def _split_name(name: str) -> tuple[str, str]:
    repo, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:
        return name, "<none>"
    return repo, tag


def _human_size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.3g}{unit}" if unit != "B" else f"{n}B"
        n /= 1000
    return f"{n}"


_AGO_UNITS = (("year", 365 * 86400), ("month", 30 * 86400), ("day", 86400), ("hour", 3600),
              ("minute", 60), ("second", 1))


def _ago(created: str | None) -> str:
    """'3 days ago', as docker shows an RFC 3339 time."""
    if not created:
        return "N/A"
    try:
        t = calendar.timegm(time.strptime(created[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return created
    age = max(int(time.time() - t), 0)
    for unit, seconds in _AGO_UNITS:
        if age >= seconds or unit == "second":
            n = age // seconds
            return f"{n} {unit}{'' if n == 1 else 's'} ago"


def _table(rows: list[list[str]]):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _short_id(image_id: str) -> str:
    return oci.digest_hex(image_id)[:12]


# -- image commands ------------------------------------------------------------

def cmd_load(args) -> int:
    loaded = load_images(_store(args), args.path, args.tag, _progress(args))
    for image, names in loaded:
        for name in names:
            _info(args, f"Loaded image: {name}")
        if not names:
            _info(args, f"Loaded image ID: {image.id}")
    return EXIT_OK


def load_images(store: Store, path: str, tag: str | None, progress: Progress) -> list[tuple[Image, list[str]]]:
    """Load every image of the archive or layout at `path` (named `tag` if
    given); returns each image with the names it got."""
    from unionfs.image.archive import open_source, read_images
    from unionfs.image.store import Staging
    tag = normalize_name(tag) if tag else None
    source = open_source(path)
    try:
        images = read_images(source)
        if tag and len(images) != 1:
            raise UserError(f"load {path}: --tag needs an archive with one image, it has {len(images)}")
        loaded = []
        with store.locked():
            staging = Staging(store, progress.warn, progress)
            try:
                staged = []
                for image in images:
                    layers = []
                    for i, sl in enumerate(image.layers):
                        layer_name = f"layer {oci.short(sl.digest or sl.diff_id)}"
                        what = f"{source.label}: {layer_name}"
                        progress.phase(f"load {layer_name} ({i + 1}/{len(image.layers)})", sl.size)
                        layers.append(staging.import_layer(
                            lambda sl=sl: source.open_checked(sl.path, "layer"),
                            sl.digest, sl.size, sl.diff_id, what))
                    staged.append((image, layers))
                for image, layers in staged:
                    names = [tag] if tag else image.names
                    loaded.append((store.add_image(staging, image.config_bytes, layers, names), names))
            finally:
                staging.cleanup()
                progress.finish()
    finally:
        source.close()
    return loaded


def cmd_ls(args) -> int:
    store = _store(args)
    rows = [["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"]]
    for image in store.images():
        if args.quiet:
            print(_short_id(image.id))
            continue
        config = store.config(image)
        size = _human_size(sum(layer.tar_size for layer in image.layers))
        for name in image.names or [None]:
            repo, tag = _split_name(name) if name else ("<none>", "<none>")
            rows.append([repo, tag, _short_id(image.id), _ago(config.get("created")), size])
    if not args.quiet:
        _table(rows)
    return EXIT_OK


def cmd_inspect(args) -> int:
    store = _store(args)
    image = store.resolve(args.image)
    config = store.config(image)
    container_config = config.get("config") or {}
    cfg = {key: container_config.get(key) for key in ("Env", "Cmd", "Entrypoint", "WorkingDir", "User")}
    cfg.update({k: v for k, v in container_config.items() if k not in cfg})
    out = {
        "Id": image.id,
        "RepoTags": image.names,
        "Created": config.get("created"),
        "Author": config.get("author", ""),
        "Architecture": config.get("architecture"),
        "Os": config.get("os"),
        "Config": cfg,
        "RootFS": {"Type": "layers", "Layers": [layer.diff_id for layer in image.layers]},
        "Size": sum(layer.tar_size for layer in image.layers),
        "Layers": [{"digest": layer.digest, "diff_id": layer.diff_id, "mediaType": layer.media_type,
                    "size": layer.size} for layer in image.layers],
    }
    print(json.dumps([out], indent=4))
    return EXIT_OK


def history_entries(config: dict, image) -> list[tuple[dict, object]]:
    """The image's history, oldest first, each entry with the layer it made
    (None for an empty_layer step); layers the history does not describe
    come last, with an empty entry."""
    history = config.get("history") or [{} for _ in image.layers]
    layers = iter(image.layers)
    entries = []
    for h in history:
        layer = None if h.get("empty_layer") else next(layers, None)
        entries.append((h, layer))
    entries.extend(({}, layer) for layer in layers)
    return entries


def cmd_history(args) -> int:
    store = _store(args)
    image = store.resolve(args.image)
    entries = history_entries(store.config(image), image)
    rows = [["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"]]
    for i, (h, layer) in enumerate(reversed(entries)):
        created_by = (h.get("created_by") or "").replace("\n", " ")
        if not args.no_trunc and len(created_by) > 45:
            created_by = created_by[:44] + "…"
        rows.append([_short_id(image.id) if i == 0 else "<missing>", _ago(h.get("created")), created_by,
                     _human_size(layer.tar_size) if layer else "0B", h.get("comment") or ""])
    _table(rows)
    return EXIT_OK


def cmd_image_rm(args) -> int:
    store = _store(args)
    with store.locked():
        for ref in args.images:
            image = store.resolve(ref)
            named = [n for n in name_candidates(ref) if n in image.names][:1]
            if named and len(image.names) > 1:
                store.untag(named[0])
                _info(args, f"Untagged: {named[0]}")
                continue
            store.remove_image(image)
            for name in image.names:
                _info(args, f"Untagged: {name}")
            _info(args, f"Deleted: {image.id}")
        store.gc()
    return EXIT_OK


def _container_name(store: Store, image) -> str:
    base = image.names[0] if image.names else _short_id(image.id)
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", _split_name(base)[0].rsplit("/", 1)[-1]).strip("-.") or "container"
    n = 1
    while store.container(f"{base}-{n}") is not None:
        n += 1
    return f"{base}-{n}"


def _image_mount_flags(optstrings) -> dict:
    from unionfs.mount import split_options
    flags = {}
    for item in split_options(optstrings or []):
        if item not in IMAGE_MOUNT_FLAGS:
            raise UserError(f"image mount: unknown option {item!r} (one of: {', '.join(IMAGE_MOUNT_FLAGS)})")
        flags[item] = True
    return flags


def mount_container(container, lowerdirs: list[str], mountpoint: str, fuse_options: dict | None = None):
    """Mount a container's rootfs: `lowerdirs` (top first) under its upper.
    `image mount` and `run` both mount through here. Returns the MountSpec
    and the daemon's pid."""
    from unionfs.mount import MountSpec, mount
    # metacopy: `chown -R` of an image copies no data; commit and diff
    # read metacopy files (their data from the image's layers).
    spec = MountSpec(lowerdirs=lowerdirs, upperdir=container.upper, workdir=container.work, whiteout="auto",
                     metacopy=True, fuse_options=dict(fuse_options or {}))
    return spec, mount(spec, mountpoint)


def cmd_image_mount(args) -> int:
    container, _, _ = mount_image(_store(args), args.image, args.mountpoint, args.name,
                                  _image_mount_flags(args.options))
    _info(args, container.name)
    return EXIT_OK


def mount_image(store: Store, ref: str, mountpoint: str, name: str | None, flags: dict | None = None):
    """Mount image `ref` as the rootfs of container `name` (made if new,
    remounted if it exists), with mount `flags` (IMAGE_MOUNT_FLAGS items);
    returns the container, its MountSpec and the daemon's pid. A container
    made here is removed again if mounting fails."""
    from unionfs.mount import existing_mountpoint
    mnt = existing_mountpoint(mountpoint)  # real path, as /proc/self/mountinfo shows it
    with store.locked():
        image = store.resolve(ref)
        container = store.container(name) if name else None
        created = container is None
        if container is not None:
            if container.image != image.id:
                raise UserError(f"container {name} exists for image {_short_id(container.image)}, "
                                f"not {ref}")
            if container.mountpoint and container.mountpoint in mounted_paths():
                raise UserError(f"container {name} is already mounted at {container.mountpoint}")
        else:
            container = store.create_container(name or _container_name(store, image), image)
        container.mountpoint = mnt
        container.image_ref = ref
        store.write_container(container)
        lowerdirs = store.lowerdirs(image)
    # Mount outside the lock: the daemon must not inherit it.
    try:
        spec, pid = mount_container(container, lowerdirs, mnt, flags)
    except BaseException:
        if created:
            with store.locked():
                store.remove_container(container)
        raise
    return container, spec, pid


def cmd_save(args) -> int:
    save_image(_store(args), args.image, args.output, args.format, _progress(args))
    return EXIT_OK


def save_image(store: Store, ref: str, output: str, fmt: str, progress: Progress):
    """Write image `ref` to the file `output` as a docker-archive or an OCI
    layout tar (`fmt`: one of FORMATS); the file appears only when complete."""
    from unionfs.image import dockerarchive, ocilayout
    if fmt not in FORMATS:
        raise UserError(f"save: format {fmt!r}: must be one of {', '.join(FORMATS)}")
    image = store.resolve(ref)
    names = [n for n in name_candidates(ref) if n in image.names][:1] or image.names
    images = [(store.config_bytes(image), image.layers, names)]
    out_path = os.path.abspath(output)
    out_dir = os.path.dirname(out_path)
    if not os.path.isdir(out_dir):
        raise UserError(f"save: {output}: directory {out_dir} does not exist")
    tmp = os.path.join(out_dir, f".{os.path.basename(out_path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            if fmt == "docker":
                dockerarchive.write_archive(out, images, store.open_tar, progress)
            else:
                ocilayout.write_archive(out, images, store.open_blob, progress)
        os.rename(tmp, out_path)
    except OSError as e:
        raise UserError(f"save: {output}: {e.strerror}") from None
    finally:
        progress.finish()
        if os.path.exists(tmp):
            os.unlink(tmp)


def cmd_tag(args) -> int:
    store = _store(args)
    name = normalize_name(args.name)
    with store.locked():
        store.tag(store.resolve(args.image), name)
    return EXIT_OK


# -- containers ----------------------------------------------------------------

def cmd_ps(args) -> int:
    from unionfs.container import lifecycle
    store = _store(args)
    mounted = mounted_paths()
    rows = [["NAME", "IMAGE", "COMMAND", "CREATED", "STATUS"]]
    tags = store.tags()
    for c in store.containers():
        status, live = lifecycle.status_text(store, c, mounted)
        if not (live or args.all):
            continue
        if args.quiet:
            print(c.name)
            continue
        rows.append([c.name, _image_shown(store, c, tags), lifecycle.command_text(c), _ago(c.created), status])
    if not args.quiet:
        _table(rows)
    return EXIT_OK


def _image_shown(store: Store, c, tags: dict[str, str]) -> str:
    """What `ps` calls a container's image: the name the user mounted it by
    while that name still means this image (as docker ps), else one of the
    image's names, else its short ID."""
    if c.image_ref:
        try:
            if store.resolve(c.image_ref).id == c.image:
                return c.image_ref
        except UserError:
            pass    # the name was removed or now means nothing
    names = sorted(n for n, i in tags.items() if i == c.image)
    return names[0] if names else _short_id(c.image)


def cmd_rm(args) -> int:
    from unionfs.container import lifecycle, record
    store = _store(args)
    for name in args.names:
        c = store.container(name)
        if c is None:
            raise UserError(f"container {name}: no such container")
        if record.is_run_container(c):
            lifecycle.remove(store, c, args.force)
            _info(args, name)
            continue
        with store.locked():
            if c.mountpoint and c.mountpoint in mounted_paths():
                if not args.force:
                    raise UserError(f"container {name} is mounted at {c.mountpoint} "
                                    f"(unionfs umount {c.mountpoint} first, or rm -f)")
                from unionfs.mount import umount
                umount(c.mountpoint)
            store.remove_container(c)
        _info(args, name)
    return EXIT_OK


def _find_container(store: Store, target: str):
    """A container by name, or by its mount point or upper dir."""
    if "/" not in target and target not in (".", ".."):
        c = store.container(target)
        if c is not None:
            return c
    if os.path.isdir(target):
        return store.container_by_mountpoint(target) or store.container_by_upper(target)
    return None


def cmd_diff(args) -> int:
    from unionfs.image.changes import diff
    store = _store(args)
    c = _find_container(store, args.target)
    if c is not None:
        upper = c.upper
        lowers = store.lowerdirs(store.image(c.image))
    elif os.path.isdir(args.target):
        if os.path.ismount(args.target):
            raise UserError(f"diff {args.target}: a mount point, but not of a container in store "
                            f"{store.root}; pass the mount's upper dir instead")
        upper = args.target
        lowers = args.lowerdir.split(":") if args.lowerdir else None
    else:
        raise UserError(f"diff {args.target}: no such container, mount point or directory")
    for code, path in diff(upper, lowers):
        sys.stdout.write(f"{code} {path}\n")
    return EXIT_OK


def cmd_commit(args) -> int:
    image = commit_container(_store(args), args.container, args.image, args.message, _progress(args),
                             changes=args.change, pause=args.pause == "true")
    _info(args, image.id)
    return EXIT_OK


def commit_container(store: Store, target: str, ref: str, message: str | None, progress: Progress,
                     changes: list[str] | None = None, pause: bool = True) -> Image:
    """Store the changes of container `target` (name or mount point) as a
    new image named `ref`; returns the new image. `changes` are Dockerfile-style
    config changes (`commit -c`); a running container is paused meanwhile
    unless `pause` is false."""
    from unionfs.image.commit import commit
    c = _find_container(store, target)
    if c is None:
        raise UserError(f"commit {target}: no such container or container mount point")
    name = normalize_name(ref)
    from unionfs.container import lifecycle
    from unionfs.container.dockerfile import apply_changes
    apply_changes({}, changes or [])     # bad -c: refused before anything is paused or written
    edit = (lambda config: apply_changes(config, changes)) if changes else None
    try:
        with lifecycle.paused(store, c, pause):
            if c.mountpoint and c.mountpoint in mounted_paths():
                os.sync()  # whatever the kernel still holds for the mount reaches the upper
            return commit(store, c.upper, store.image(c.image), [name], message, progress.warn, progress,
                          edit_config=edit)
    finally:
        progress.finish()
