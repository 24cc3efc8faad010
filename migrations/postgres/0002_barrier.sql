-- The sub-transaction barrier: one row per (gid, branch, op) a participant
-- performed, written in the same local transaction as the business change.
-- `reason` is the op that wrote the row: an undo (cancel, compensate,
-- rollback) that finds no row of its forward op writes that row itself,
-- with its own name as the reason, so the late forward op is refused.
CREATE TABLE IF NOT EXISTS tandem_barrier (
    gid        VARCHAR(128) NOT NULL,
    branch_id  VARCHAR(128) NOT NULL,
    op         VARCHAR(16)  NOT NULL,
    reason     VARCHAR(16)  NOT NULL,
    created_at TIMESTAMPTZ  NOT NULL DEFAULT now(),
    PRIMARY KEY (gid, branch_id, op)
);
