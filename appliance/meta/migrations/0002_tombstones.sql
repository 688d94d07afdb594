-- Cairn metadata schema, version 2: tombstones of deleted keys.
-- A delete of a key that had a current version writes a tombstone blob under the key's
-- prefix (docs/FORMAT.md) so that reads served from blobs while this database is down
-- never bring the key back. The tombstone's blob is a chunk (refcount 0, never on the gc
-- queue while its row exists) whose locations hold its quota. One row per key: the
-- newest delete. A commit of a newer version drops the row (its chunk goes to the gc
-- queue); a commit of an older version loses to it, as to a newer version.
CREATE TABLE tombstones (
    bucket {{KEY}} NOT NULL,
    key {{KEY}} NOT NULL,
    version_id TEXT NOT NULL UNIQUE,
    chunk_id TEXT NOT NULL REFERENCES chunks (chunk_id),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (bucket, key)
);
