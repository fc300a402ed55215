-- Indexes that keep a Profile API page of a huge profile as cheap as one of a small one.

-- The identifiers dropped from the messages of one page of events (a bot sending a blocked value
-- leaves a row per message: reading all of the profile's rows took 0.4 s per page at 100,000).
CREATE INDEX dropped_by_message ON dropped (space, message_id);

-- An account's links in page order (at, user_id): a page of an account with 200,000 users reads that
-- page, not every link of the account.
DROP INDEX links_by_account;
CREATE INDEX links_by_account ON links (space, account_id, at, user_id);
