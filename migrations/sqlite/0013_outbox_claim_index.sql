-- A claim walks one partner's due rows of one state in (not_before, seq) order and stops after `batch` of them,
-- whatever the table's size or the planner's statistics; an operator's listing by state (`?state=dead`) walks
-- that state in seq order instead of every row delivered before it.
DROP INDEX outbox_due;
CREATE INDEX outbox_due ON outbox (partner, state, not_before, seq);
CREATE INDEX outbox_by_state ON outbox (state, seq);
