-- Cairn metadata schema, version 1.
-- Written once for both databases: {{ID}}, {{BLOB}} and {{KEY}} are filled per dialect
-- (appliance/meta/dialect.py). Instants are BIGINT microseconds since the epoch, UTC.

CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE buckets (
    name {{KEY}} PRIMARY KEY,
    created_at BIGINT NOT NULL
);

CREATE TABLE credentials (
    access_key TEXT PRIMARY KEY,
    secret TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL
);

CREATE TABLE grants (
    access_key TEXT NOT NULL REFERENCES credentials (access_key) ON DELETE CASCADE,
    bucket TEXT NOT NULL,
    permissions TEXT NOT NULL,
    PRIMARY KEY (access_key, bucket)
);

-- One version of an object, or the data of a multipart part (kind = 'part').
CREATE TABLE versions (
    version_id TEXT PRIMARY KEY,
    bucket {{KEY}} NOT NULL REFERENCES buckets (name),
    key {{KEY}} NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    size BIGINT NOT NULL DEFAULT 0,
    etag TEXT NOT NULL DEFAULT '',
    headers TEXT NOT NULL DEFAULT '{}',
    user_metadata TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL,
    completed_at BIGINT
);
CREATE INDEX versions_state_created ON versions (state, created_at);
CREATE INDEX versions_bucket_key ON versions (bucket, key);

-- The current version of each key: what reads and listings see.
CREATE TABLE objects (
    bucket {{KEY}} NOT NULL REFERENCES buckets (name),
    key {{KEY}} NOT NULL,
    version_id TEXT NOT NULL,
    size BIGINT NOT NULL,
    etag TEXT NOT NULL,
    modified_at BIGINT NOT NULL,
    PRIMARY KEY (bucket, key)
);

CREATE TABLE chunks (
    chunk_id TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    sha256 {{BLOB}} NOT NULL,
    stored_size BIGINT NOT NULL,
    wrapped_dek {{BLOB}},
    key_id TEXT,
    refcount BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX chunks_unreferenced ON chunks (refcount) WHERE refcount = 0;

CREATE TABLE chunk_refs (
    version_id TEXT NOT NULL REFERENCES versions (version_id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    "offset" BIGINT NOT NULL,
    length BIGINT NOT NULL,
    chunk_id TEXT NOT NULL REFERENCES chunks (chunk_id),
    chunk_offset BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (version_id, seq)
);
CREATE INDEX chunk_refs_chunk ON chunk_refs (chunk_id);

CREATE TABLE locations (
    chunk_id TEXT NOT NULL REFERENCES chunks (chunk_id),
    backend TEXT NOT NULL,
    blob_key TEXT NOT NULL,
    stored_size BIGINT NOT NULL,
    PRIMARY KEY (chunk_id, backend)
);
CREATE INDEX locations_backend ON locations (backend);

-- Quota ledger per backend: used = bytes of blobs present, reserved = writes in flight.
CREATE TABLE backend_space (
    name TEXT PRIMARY KEY,
    quota_bytes BIGINT,
    used_bytes BIGINT NOT NULL DEFAULT 0,
    reserved_bytes BIGINT NOT NULL DEFAULT 0,
    CHECK (used_bytes >= 0 AND reserved_bytes >= 0)
);

CREATE TABLE reservations (
    reservation_id {{ID}},
    backend TEXT NOT NULL REFERENCES backend_space (name),
    nbytes BIGINT NOT NULL,
    owner TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX reservations_owner ON reservations (owner);
CREATE INDEX reservations_created ON reservations (created_at);

-- Monthly usage counters per backend (month = 'YYYY-MM', UTC).
CREATE TABLE usage (
    backend TEXT NOT NULL,
    month TEXT NOT NULL,
    requests BIGINT NOT NULL DEFAULT 0,
    egress_bytes BIGINT NOT NULL DEFAULT 0,
    ingress_bytes BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (backend, month)
);

-- Durable work queues with backoff and a dead-letter state.
CREATE TABLE queue_items (
    item_id {{ID}},
    queue TEXT NOT NULL,
    item_key TEXT,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    not_before BIGINT NOT NULL,
    last_error TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX queue_items_ready ON queue_items (queue, state, not_before);
CREATE UNIQUE INDEX queue_items_key ON queue_items (queue, item_key);

CREATE TABLE multipart_uploads (
    upload_id TEXT PRIMARY KEY,
    bucket {{KEY}} NOT NULL REFERENCES buckets (name),
    key {{KEY}} NOT NULL,
    headers TEXT NOT NULL DEFAULT '{}',
    user_metadata TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL
);
CREATE INDEX multipart_uploads_key ON multipart_uploads (bucket, key, upload_id);

CREATE TABLE parts (
    upload_id TEXT NOT NULL REFERENCES multipart_uploads (upload_id) ON DELETE CASCADE,
    part_number INTEGER NOT NULL,
    version_id TEXT NOT NULL REFERENCES versions (version_id),
    size BIGINT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (upload_id, part_number)
);
