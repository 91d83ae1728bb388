"""Containers: an image's config turned into a process run by an OCI runtime
(runc or crun) on a unionfs rootfs. See DESIGN.md section 6."""
