-- ITU-MiniTwit's schema on PostgreSQL: the three tables of the original SQLite schema
-- (user, follower, message; "user" is quoted because it is a reserved word here) plus
-- `latest`, the simulator's last-seen request id, kept in the database so that every node
-- answers /latest with the same, never decreasing, value across a failover.
-- Idempotent: safe to apply to a database that already has it.
CREATE TABLE IF NOT EXISTS "user" (
    user_id  SERIAL PRIMARY KEY,
    username TEXT NOT NULL,
    email    TEXT NOT NULL,
    pw_hash  TEXT NOT NULL
);
-- Two nodes may register the same name at once; the database, not the app, decides.
CREATE UNIQUE INDEX IF NOT EXISTS user_username_key ON "user" (username);

CREATE TABLE IF NOT EXISTS follower (
    who_id  INTEGER NOT NULL,
    whom_id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS follower_who_idx ON follower (who_id);

CREATE TABLE IF NOT EXISTS message (
    message_id SERIAL PRIMARY KEY,
    author_id  INTEGER NOT NULL,
    text       TEXT NOT NULL,
    pub_date   INTEGER,
    flagged    INTEGER
);
CREATE INDEX IF NOT EXISTS message_author_idx ON message (author_id);
CREATE INDEX IF NOT EXISTS message_pub_date_idx ON message (pub_date DESC);

CREATE TABLE IF NOT EXISTS latest (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value BIGINT NOT NULL
);
