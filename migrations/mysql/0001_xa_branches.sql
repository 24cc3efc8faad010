-- XA branches of Tandem transactions in this database. A row in state
-- 'committed' is written inside the XA transaction itself, so it exists only
-- if that transaction committed; a 'rolledback' row is the tombstone a
-- rollback leaves, so a late prepare of the same branch fails on the key.
CREATE TABLE IF NOT EXISTS tandem_xa_branches (
    gid         VARCHAR(128) NOT NULL,
    branch_id   VARCHAR(128) NOT NULL,
    state       VARCHAR(16)  NOT NULL,
    fence_term  BIGINT       NOT NULL,
    fence_index BIGINT       NOT NULL,
    created_at  TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (gid, branch_id)
) ENGINE = InnoDB;
