-- devstack only (never in production migrations): change notifications for the GraphQL
-- stand-in's live queries. Real Hasura polls; the stand-in re-runs a live query as soon as a
-- statement on a table it reads commits, and polls as well (refetch interval).
--
-- Installed idempotently by `Hasura::new`; running it again replaces the functions and keeps
-- the triggers. `devstack.track_table_changes('whist.instances'::regclass)` adds the trigger
-- to one table.

CREATE SCHEMA IF NOT EXISTS devstack;

-- One notification per statement (not per row), with the table as payload. NOTIFY delivers
-- at commit and folds identical payloads of one transaction into one.
CREATE OR REPLACE FUNCTION devstack.notify_table_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('devstack_table_changes', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);
  RETURN NULL;
END
$$;

-- Creates the trigger unless it is there already: an existing trigger already calls the
-- function above (replaced in place), and skipping the DROP spares the table an exclusive lock.
-- Only tables get one (views and foreign tables take no AFTER ... TRUNCATE trigger); live
-- queries over anything else still see changes through the refetch interval.
CREATE OR REPLACE FUNCTION devstack.track_table_changes(target regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  IF (SELECT relkind FROM pg_catalog.pg_class WHERE oid = target) NOT IN ('r', 'p') THEN
    RETURN;
  END IF;
  IF NOT EXISTS (
    SELECT 1 FROM pg_catalog.pg_trigger
    WHERE tgrelid = target AND tgname = 'devstack_notify_table_change'
  ) THEN
    EXECUTE format(
      'CREATE TRIGGER devstack_notify_table_change '
      'AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s '
      'FOR EACH STATEMENT EXECUTE FUNCTION devstack.notify_table_change()',
      target);
  END IF;
END
$$;
