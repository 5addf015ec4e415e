-- Consumed offsets live next to the data they describe: a batch's rows and its
-- offsets commit in one transaction. `fence` is bumped by every member that is
-- assigned the partition; a batch commits only if its fence is still current,
-- so a member that lost the partition (a zombie) cannot commit a stale batch.

CREATE TABLE consumer_offsets (
    group_id    text        NOT NULL,
    topic       text        NOT NULL,
    "partition" integer     NOT NULL,
    next_offset bigint      CHECK (next_offset >= 0),  -- NULL: nothing consumed yet
    fence       bigint      NOT NULL DEFAULT 0,
    owner       text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, "partition")
);
