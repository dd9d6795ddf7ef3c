-- comfy-runners schema, version 2.
--
-- This file is the single source of the schema: the binary embeds it, applies
-- it to a new database and records the version in PRAGMA user_version. A later
-- version of this file is accompanied by a migration step in src/db.rs that
-- moves an existing database forward inside one transaction.
--
-- Timestamps are whole seconds since the Unix epoch, UTC.

-- A person or script that owns runners. `uuid` is the public id.
CREATE TABLE users (
    id          INTEGER PRIMARY KEY,
    uuid        TEXT    NOT NULL UNIQUE,
    name        TEXT    NOT NULL UNIQUE,
    email       TEXT    NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

-- API tokens. Only the SHA-256 of a token is kept; the token itself is shown
-- once, when it is created.
CREATE TABLE tokens (
    id            TEXT    NOT NULL UNIQUE,           -- public id (UUID), for `token revoke`
    user_id       INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    hash          BLOB    NOT NULL UNIQUE,           -- sha256(token)
    name          TEXT    NOT NULL DEFAULT '',       -- the label
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER,
    last_used_at  INTEGER,
    revoked_at    INTEGER
);
CREATE INDEX tokens_by_user ON tokens(user_id);

-- Runners. `doc` is the runner object exactly as the API returns it, rendered
-- once on every write, so that a list is a concatenation of stored documents.
-- The columns beside it are the ones the list filters and sorts on; they are
-- written together with `doc` by the one module that writes runners.
CREATE TABLE runners (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order, never reused
    ord         INTEGER NOT NULL,      -- creation order: breaks created_at ties
    id          TEXT    NOT NULL UNIQUE,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    status      TEXT    NOT NULL CHECK (status IN ('active', 'disabled')),
    created_at  INTEGER NOT NULL,
    doc         TEXT    NOT NULL
);
-- The list order is (created_at DESC, ord DESC), a total order (ord is
-- unique); each index below serves one filter and that order without a sort.
--
-- A runner created through the API gets ord = seq. An import of N runners
-- appends them in file order (seq rising, so table pages fill densely) but
-- gives them ord values falling through the same range, so that runners
-- created in the same second list back in the order of the file. Because
-- AUTOINCREMENT never hands out a seq twice, even after deletes, a new
-- runner's ord is above every ord given before it.
CREATE INDEX runners_by_user        ON runners(user_id, created_at, ord);
CREATE INDEX runners_by_user_status ON runners(user_id, status, created_at, ord);

-- How many runners each user has in each status, kept exact by the triggers
-- below inside the same transaction as the change itself, so `total` is one
-- primary-key lookup instead of a scan and can never drift from COUNT(*).
CREATE TABLE runner_counts (
    user_id  INTEGER NOT NULL,
    status   TEXT    NOT NULL,
    n        INTEGER NOT NULL,
    PRIMARY KEY (user_id, status)
) WITHOUT ROWID;

-- The triggers never use an upsert (INSERT ... ON CONFLICT DO UPDATE): its
-- DO UPDATE part can abort a statement whatever the statement's own conflict
-- clause says, and a statement that may abort halfway must keep a journal of
-- every page it touches. Written as below, an `INSERT OR ROLLBACK` into
-- runners (the import) needs no statement journal at all. (Version 1 used
-- upserts; migration 2 in src/db.rs replaces them with these.)
CREATE TRIGGER runners_count_insert AFTER INSERT ON runners
BEGIN
    INSERT INTO runner_counts (user_id, status, n)
        SELECT NEW.user_id, NEW.status, 0
        WHERE NOT EXISTS (SELECT 1 FROM runner_counts
                          WHERE user_id = NEW.user_id AND status = NEW.status);
    UPDATE runner_counts SET n = n + 1
        WHERE user_id = NEW.user_id AND status = NEW.status;
END;

CREATE TRIGGER runners_count_delete AFTER DELETE ON runners
BEGIN
    UPDATE runner_counts SET n = n - 1
        WHERE user_id = OLD.user_id AND status = OLD.status;
END;

CREATE TRIGGER runners_count_update AFTER UPDATE OF user_id, status ON runners
    WHEN OLD.user_id IS NOT NEW.user_id OR OLD.status IS NOT NEW.status
BEGIN
    UPDATE runner_counts SET n = n - 1
        WHERE user_id = OLD.user_id AND status = OLD.status;
    INSERT INTO runner_counts (user_id, status, n)
        SELECT NEW.user_id, NEW.status, 0
        WHERE NOT EXISTS (SELECT 1 FROM runner_counts
                          WHERE user_id = NEW.user_id AND status = NEW.status);
    UPDATE runner_counts SET n = n + 1
        WHERE user_id = NEW.user_id AND status = NEW.status;
END;
