"""KV v2 through hvac, against spike and against OpenBao (the same expectations: Vault's)."""

from __future__ import annotations

import hvac
import pytest
from hvac import exceptions

from tests.vault.clients import hvac_client, raw
from tests.vault.deployments import MOUNT, Target

KV = {"mount_point": MOUNT}


def test_write_then_read_versions(vault: hvac.Client, unique: str) -> None:
    first = vault.secrets.kv.v2.create_or_update_secret(unique, secret={"user": "admin", "pw": "one"}, **KV)
    assert first["data"]["version"] == 1
    assert first["data"]["destroyed"] is False
    assert first["data"]["deletion_time"] == ""
    assert first["wrap_info"] is None
    second = vault.secrets.kv.v2.create_or_update_secret(unique, secret={"user": "admin", "pw": "two"}, **KV)
    assert second["data"]["version"] == 2

    latest = vault.secrets.kv.v2.read_secret_version(unique, raise_on_deleted_version=True, **KV)
    assert latest["data"]["data"] == {"user": "admin", "pw": "two"}
    assert latest["data"]["metadata"]["version"] == 2
    assert latest["data"]["metadata"]["created_time"].endswith("Z")
    old = vault.secrets.kv.v2.read_secret_version(unique, version=1, raise_on_deleted_version=True, **KV)
    assert old["data"]["data"]["pw"] == "one"
    with pytest.raises(exceptions.InvalidPath):
        vault.secrets.kv.v2.read_secret_version(unique, version=7, raise_on_deleted_version=True, **KV)
    with pytest.raises(exceptions.InvalidPath):
        vault.secrets.kv.v2.read_secret_version(unique + "-absent", raise_on_deleted_version=True, **KV)


def test_envelope_and_error_bodies_are_vaults(target: Target, vault: hvac.Client, unique: str) -> None:
    token = vault.token
    put = raw(target, "POST", f"/v1/{MOUNT}/data/{unique}", {"data": {"k": "v"}}, token=token)
    assert put.status == 200
    assert set(put.body) >= {
        "request_id",
        "lease_id",
        "renewable",
        "lease_duration",
        "data",
        "wrap_info",
        "warnings",
        "auth",
    }
    assert (put.body["lease_id"], put.body["renewable"], put.body["lease_duration"]) == ("", False, 0)
    assert put.body["wrap_info"] is None and put.body["warnings"] is None and put.body["auth"] is None
    assert put.headers["content-type"].startswith("application/json")

    conflict = raw(
        target, "POST", f"/v1/{MOUNT}/data/{unique}", {"data": {"k": "v"}, "options": {"cas": 0}}, token=token
    )
    assert conflict.status == 400
    assert conflict.body == {"errors": ["check-and-set parameter did not match the current version"]}

    missing = raw(target, "GET", f"/v1/{MOUNT}/data/{unique}-absent", token=token)
    assert (missing.status, missing.body) == (404, {"errors": []})

    no_data = raw(target, "POST", f"/v1/{MOUNT}/data/{unique}", {"values": {}}, token=token)
    assert (no_data.status, no_data.body) == (400, {"errors": ["no data provided"]})

    deleted = raw(target, "DELETE", f"/v1/{MOUNT}/data/{unique}", token=token)
    assert (deleted.status, deleted.body) == (204, None)
    assert deleted.headers.get("content-length", "0") == "0"

    gone = raw(target, "GET", f"/v1/{MOUNT}/data/{unique}", token=token)
    assert gone.status == 404
    assert gone.body["data"]["data"] is None
    assert gone.body["data"]["metadata"]["deletion_time"] != ""

    bad_path = raw(target, "GET", f"/v1/{MOUNT}/{unique}", token=token)
    assert bad_path.status == 404
    assert bad_path.body["data"] is None
    assert "Invalid path for a versioned K/V secrets engine" in bad_path.body["warnings"][0]

    unsupported = raw(target, "LIST", f"/v1/{MOUNT}/data/{unique}", token=token)
    assert unsupported.status == 405
    assert unsupported.body == {"errors": ["1 error occurred:\n\t* unsupported operation\n\n"]}


def test_check_and_set(vault: hvac.Client, unique: str) -> None:
    kv = vault.secrets.kv.v2
    assert kv.create_or_update_secret(unique, secret={"a": "1"}, cas=0, **KV)["data"]["version"] == 1
    with pytest.raises(exceptions.InvalidRequest, match="did not match the current version"):
        kv.create_or_update_secret(unique, secret={"a": "2"}, cas=0, **KV)
    with pytest.raises(exceptions.InvalidRequest, match="did not match the current version"):
        kv.create_or_update_secret(unique, secret={"a": "2"}, cas=5, **KV)
    assert kv.create_or_update_secret(unique, secret={"a": "2"}, cas=1, **KV)["data"]["version"] == 2

    kv.update_metadata(unique, cas_required=True, **KV)
    with pytest.raises(exceptions.InvalidRequest, match="check-and-set parameter required for this call"):
        kv.create_or_update_secret(unique, secret={"a": "3"}, **KV)
    assert kv.create_or_update_secret(unique, secret={"a": "3"}, cas=2, **KV)["data"]["version"] == 3


def test_delete_undelete_destroy(target: Target, vault: hvac.Client, unique: str) -> None:
    kv = vault.secrets.kv.v2
    for value in ("1", "2", "3"):
        kv.create_or_update_secret(unique, secret={"v": value}, **KV)

    kv.delete_latest_version_of_secret(unique, **KV)
    with pytest.raises(exceptions.InvalidPath):
        kv.read_secret_version(unique, raise_on_deleted_version=True, **KV)
    soft = kv.read_secret_version(unique, raise_on_deleted_version=False, **KV)
    assert soft["data"]["data"] is None
    assert soft["data"]["metadata"]["version"] == 3 and soft["data"]["metadata"]["deletion_time"]

    kv.undelete_secret_versions(unique, versions=[3], **KV)
    assert kv.read_secret_version(unique, raise_on_deleted_version=True, **KV)["data"]["data"] == {"v": "3"}

    kv.delete_secret_versions(unique, versions=[1, 2], **KV)
    kv.destroy_secret_versions(unique, versions=[2], **KV)
    versions = kv.read_secret_metadata(unique, **KV)["data"]["versions"]
    assert versions["1"]["deletion_time"] and not versions["1"]["destroyed"]
    assert versions["2"]["destroyed"] is True
    assert versions["3"]["deletion_time"] == "" and versions["3"]["destroyed"] is False
    destroyed = kv.read_secret_version(unique, version=2, raise_on_deleted_version=False, **KV)
    assert destroyed["data"]["data"] is None and destroyed["data"]["metadata"]["destroyed"] is True
    # Undeleting a destroyed version brings nothing back.
    kv.undelete_secret_versions(unique, versions=[1, 2], **KV)
    assert kv.read_secret_version(unique, version=1, raise_on_deleted_version=True, **KV)["data"]["data"] == {"v": "1"}
    with pytest.raises(exceptions.InvalidPath):
        kv.read_secret_version(unique, version=2, raise_on_deleted_version=True, **KV)

    # Nothing to act on is not an error (Vault answers 204), but naming no version is.
    kv.delete_secret_versions(unique + "-absent", versions=[1], **KV)
    empty = raw(target, "POST", f"/v1/{MOUNT}/delete/{unique}", {"versions": []}, token=vault.token)
    assert (empty.status, empty.body) == (400, {"errors": ["No version number provided"]})


def test_metadata(vault: hvac.Client, unique: str) -> None:
    kv = vault.secrets.kv.v2
    kv.create_or_update_secret(unique, secret={"v": "1"}, **KV)
    kv.update_metadata(unique, max_versions=3, custom_metadata={"owner": "payments"}, **KV)
    meta = kv.read_secret_metadata(unique, **KV)["data"]
    assert meta["max_versions"] == 3
    assert meta["custom_metadata"] == {"owner": "payments"}
    assert meta["current_version"] == 1
    assert meta["cas_required"] is False
    assert meta["delete_version_after"] == "0s"
    assert set(meta["versions"]) == {"1"}
    for value in ("2", "3", "4", "5"):
        written = kv.create_or_update_secret(unique, secret={"v": value}, **KV)
        assert written["data"]["custom_metadata"] == {"owner": "payments"}
    kept = kv.read_secret_metadata(unique, **KV)["data"]["versions"]
    assert set(kept) == {"3", "4", "5"}  # max_versions 3: the oldest fall off
    with pytest.raises(exceptions.InvalidPath):
        kv.read_secret_version(unique, version=1, raise_on_deleted_version=True, **KV)

    kv.delete_metadata_and_all_versions(unique, **KV)
    with pytest.raises(exceptions.InvalidPath):
        kv.read_secret_metadata(unique, **KV)
    with pytest.raises(exceptions.InvalidPath):
        kv.read_secret_version(unique, raise_on_deleted_version=True, **KV)


def test_list_shows_children_and_folders(vault: hvac.Client, unique: str) -> None:
    kv = vault.secrets.kv.v2
    for path in ("db", "cache", "nested/one", "nested/two", "nested/deeper/three"):
        kv.create_or_update_secret(f"{unique}/{path}", secret={"v": "x"}, **KV)
    assert sorted(kv.list_secrets(unique, **KV)["data"]["keys"]) == ["cache", "db", "nested/"]
    assert sorted(kv.list_secrets(f"{unique}/nested/", **KV)["data"]["keys"]) == ["deeper/", "one", "two"]
    with pytest.raises(exceptions.InvalidPath):
        kv.list_secrets(f"{unique}/nothing-here", **KV)


def test_subkeys(target: Target, vault: hvac.Client, unique: str) -> None:
    kv = vault.secrets.kv.v2
    kv.create_or_update_secret(unique, secret={"user": "u", "pw": "p"}, **KV)
    answer = raw(target, "GET", f"/v1/{MOUNT}/subkeys/{unique}", token=vault.token)
    assert answer.status == 200
    assert answer.body["data"]["subkeys"] == {"user": None, "pw": None}
    assert answer.body["data"]["metadata"]["version"] == 1
    assert raw(target, "GET", f"/v1/{MOUNT}/subkeys/{unique}-absent", token=vault.token).status == 404


def test_config(target: Target, vault: hvac.Client) -> None:
    config = vault.secrets.kv.v2.read_configuration(**KV)["data"]
    assert config["cas_required"] is False
    assert config["delete_version_after"] == "0s"
    assert isinstance(config["max_versions"], int)
    # Writing what is already in force is accepted by both.
    vault.secrets.kv.v2.configure(max_versions=config["max_versions"], cas_required=False, **KV)
    if target.is_spike:
        # spike's mount-wide settings are fixed (per-secret ones are in the metadata): a change is refused.
        with pytest.raises(exceptions.InvalidRequest, match="mount-wide"):
            vault.secrets.kv.v2.configure(cas_required=True, **KV)


def test_values_that_are_not_strings(target: Target, vault: hvac.Client, unique: str) -> None:
    """Vault stores any JSON; spike's store (shared with the SPIKE API) keeps strings: it says so and writes nothing."""
    if target.is_spike:
        with pytest.raises(exceptions.InvalidRequest, match="string values only"):
            vault.secrets.kv.v2.create_or_update_secret(unique, secret={"port": 5432}, **KV)
        with pytest.raises(exceptions.InvalidPath):
            vault.secrets.kv.v2.read_secret_version(unique, raise_on_deleted_version=True, **KV)
    else:
        written = vault.secrets.kv.v2.create_or_update_secret(unique, secret={"port": 5432}, **KV)
        assert written["data"]["version"] == 1


def test_patch_through_http_merge_patch(target: Target, vault: hvac.Client, unique: str) -> None:
    vault.secrets.kv.v2.create_or_update_secret(unique, secret={"user": "u", "pw": "p", "old": "x"}, **KV)
    patch = {"data": {"pw": "q", "old": None}}
    refused = raw(target, "PATCH", f"/v1/{MOUNT}/data/{unique}", patch, token=vault.token)
    assert refused.status == 415  # PATCH wants RFC 7396's media type
    done = raw(
        target,
        "PATCH",
        f"/v1/{MOUNT}/data/{unique}",
        patch,
        token=vault.token,
        content_type="application/merge-patch+json",
    )
    assert done.status == 200 and done.body["data"]["version"] == 2
    latest = vault.secrets.kv.v2.read_secret_version(unique, raise_on_deleted_version=True, **KV)
    assert latest["data"]["data"] == {"user": "u", "pw": "q"}
    stale = raw(
        target,
        "PATCH",
        f"/v1/{MOUNT}/data/{unique}",
        {"data": {"pw": "r"}, "options": {"cas": 1}},
        token=vault.token,
        content_type="application/merge-patch+json",
    )
    assert stale.status == 400
    absent = raw(
        target,
        "PATCH",
        f"/v1/{MOUNT}/data/{unique}-absent",
        patch,
        token=vault.token,
        content_type="application/merge-patch+json",
    )
    assert absent.status == 404

    meta = raw(
        target,
        "PATCH",
        f"/v1/{MOUNT}/metadata/{unique}",
        {"custom_metadata": {"team": "a"}},
        token=vault.token,
        content_type="application/merge-patch+json",
    )
    assert meta.status == 204
    assert vault.secrets.kv.v2.read_secret_metadata(unique, **KV)["data"]["custom_metadata"] == {"team": "a"}


def test_the_policies_decide(target: Target, unique: str) -> None:
    web = hvac_client(target, "web")
    web.secrets.kv.v2.create_or_update_secret(unique, secret={"v": "1"}, **KV)
    with pytest.raises(exceptions.InvalidRequest):  # no cert role / no policy: the login is refused
        hvac_client(target, "stranger")
    stranger = hvac_client(target, "stranger", login=False)
    with pytest.raises(exceptions.Forbidden):
        stranger.secrets.kv.v2.read_secret_version(unique, raise_on_deleted_version=True, **KV)
    with pytest.raises(exceptions.Forbidden):
        stranger.secrets.kv.v2.create_or_update_secret(unique, secret={"v": "2"}, **KV)
    denied = raw(target, "GET", f"/v1/{MOUNT}/data/{unique}", who="stranger")
    assert denied.status == 403
    assert denied.body["errors"] and "permission denied" in denied.body["errors"][0]
