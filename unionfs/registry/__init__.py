"""The OCI distribution (registry v2) client: references, credentials and
auth, the HTTP client, push and pull. The store stays the only writer of
images: pull stages blobs through `Store`/`Staging`, push reads them back."""
