-- Every rejected message, with its original bytes and where it came from, so
-- nothing is dropped silently and anything can be replayed after a fix.

CREATE TABLE dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic       text        NOT NULL,
    "partition" integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    message_key bytea,
    payload     bytea,
    reason      text        NOT NULL,
    detail      text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX dead_letters_received_at ON dead_letters (received_at);
CREATE INDEX dead_letters_reason ON dead_letters (reason, received_at);
CREATE INDEX dead_letters_source ON dead_letters (topic, "partition", "offset");
