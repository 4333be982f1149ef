-- Autovacuum for the hot tables (issue 25's soak): every task row is
-- updated two or three times and, with retention, deleted; at thousands of
-- tasks a second the default (a vacuum after 20 % of the table is dead,
-- throttled by the cost delay) leaves more dead rows than live ones and
-- the table keeps growing. Vacuum these after 2 % and unthrottled: each
-- pass is short, and the space of pruned jobs is reused.
ALTER TABLE tasks SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE attempts SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE task_events SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);
