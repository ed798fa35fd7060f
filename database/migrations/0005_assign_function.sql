-- Assignment in one round trip and one transaction: `whist.assign_mandelbox`, tracked by Hasura
-- as a mutation (`whist_assign_mandelbox`), does the per-user limit, the choice of host and the
-- claim together. Before it, assign made four to six sequential GraphQL requests, and its
-- per-user limit was count-then-insert, so concurrent requests of one user all passed it.
--
-- Hasura tracks only functions that return rows of a tracked table, so the answer's shape is the
-- table `whist.assign_results`. It never holds a row (its CHECK refuses every insert); the
-- function builds its one result row in memory.

CREATE TABLE whist.assign_results (
  -- OK, USER_ALREADY_ACTIVE, COMMIT_HASH_MISMATCH or NO_INSTANCE_AVAILABLE.
  outcome         varchar NOT NULL,
  -- The rest is set for OK only.
  region          varchar,
  mandelbox_id    uuid,
  instance_id     varchar,
  ip_addr         inet,
  tls_fingerprint varchar,
  -- Whether a warm (WAITING) box was claimed rather than a new slot taken.
  warm            boolean,
  CONSTRAINT assign_results_hold_no_rows CHECK (false)
);

-- One call, one transaction:
--   1. the user's lock (a transaction-scoped advisory lock on the user id), so two requests of
--      one user are serialised and the limit below is exact;
--   2. the per-user limit: mandelboxes of the user that are not DYING;
--   3. for each region in the client's order, on the region's current image and on ACTIVE hosts
--      of the wanted commit that have an address and a published certificate fingerprint:
--      a. a warm box: the oldest WAITING row of the app, locked with SKIP LOCKED so concurrent
--         assigns take different rows without waiting, turned into the user's ALLOCATED row
--         (a WAITING row already holds its unit of capacity);
--      b. else a slot on the fullest host (bin-packing): a guarded capacity decrement, re-checked
--         on the row it waited for, then the ALLOCATED row's insert;
--   4. else COMMIT_HASH_MISMATCH if a host of another commit could have served, or
--      NO_INSTANCE_AVAILABLE.
-- `any_commit` (local development's `local_dev` client) takes the image's commit as wanted.
CREATE FUNCTION whist.assign_mandelbox(
  provider         text,
  user_id          text,
  session_id       text,
  regions          text,
  client_commit    text,
  any_commit       boolean,
  mandelbox_limit  integer,
  app              text,
  new_mandelbox_id uuid
) RETURNS SETOF whist.assign_results
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
  wanted_region text;
  image         whist.images;
  wanted        text;
  chosen        whist.instances;
  warm_box           whist.mandelboxes;
  mismatch      boolean := false;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtextextended('whist.assign:' || assign_mandelbox.user_id, 0));
  IF (SELECT count(*) FROM whist.mandelboxes AS m
      WHERE m.user_id = assign_mandelbox.user_id AND m.status <> 'DYING')
     >= assign_mandelbox.mandelbox_limit THEN
    RETURN QUERY SELECT 'USER_ALREADY_ACTIVE'::varchar, NULL::varchar, NULL::uuid,
      NULL::varchar, NULL::inet, NULL::varchar, NULL::boolean;
    RETURN;
  END IF;

  FOR wanted_region IN
    SELECT r.name FROM unnest(string_to_array(assign_mandelbox.regions, ','))
      WITH ORDINALITY AS r(name, rank)
    WHERE r.name <> '' ORDER BY r.rank
  LOOP
    SELECT * INTO image FROM whist.images AS i
    WHERE i.provider = assign_mandelbox.provider AND i.region = wanted_region;
    IF NOT FOUND THEN
      CONTINUE;
    END IF;
    wanted := CASE WHEN assign_mandelbox.any_commit THEN image.client_sha
                   ELSE assign_mandelbox.client_commit END;

    -- a. a warm box.
    SELECT m.* INTO warm_box FROM whist.mandelboxes AS m
    JOIN whist.instances AS h ON h.id = m.instance_id
    WHERE m.status = 'WAITING' AND m.app = assign_mandelbox.app
      AND h.status = 'ACTIVE' AND h.provider = image.provider AND h.region = wanted_region
      AND h.image_id = image.image_id
      AND h.client_sha = wanted AND h.ip_addr IS NOT NULL AND h.tls_fingerprint IS NOT NULL
    ORDER BY m.created_at, m.id
    LIMIT 1
    FOR UPDATE OF m SKIP LOCKED;
    IF FOUND THEN
      UPDATE whist.mandelboxes AS m
      SET status = 'ALLOCATED', user_id = assign_mandelbox.user_id,
          session_id = assign_mandelbox.session_id
      WHERE m.id = warm_box.id AND m.status = 'WAITING';
      IF FOUND THEN
        RETURN QUERY SELECT 'OK'::varchar, wanted_region::varchar, warm_box.id, h.id, h.ip_addr,
          h.tls_fingerprint, true
        FROM whist.instances AS h WHERE h.id = warm_box.instance_id;
        RETURN;
      END IF;
    END IF;

    -- b. a new slot, fullest host first.
    FOR chosen IN
      SELECT h.* FROM whist.instances AS h
      WHERE h.status = 'ACTIVE' AND h.provider = image.provider AND h.region = wanted_region
        AND h.image_id = image.image_id
        AND h.client_sha = wanted AND h.remaining_capacity > 0
        AND h.ip_addr IS NOT NULL AND h.tls_fingerprint IS NOT NULL
      ORDER BY h.remaining_capacity, h.id
    LOOP
      UPDATE whist.instances AS h SET remaining_capacity = h.remaining_capacity - 1
      WHERE h.id = chosen.id AND h.status = 'ACTIVE' AND h.remaining_capacity > 0;
      IF FOUND THEN
        INSERT INTO whist.mandelboxes (id, app, instance_id, user_id, session_id, status)
        VALUES (assign_mandelbox.new_mandelbox_id, assign_mandelbox.app, chosen.id,
                assign_mandelbox.user_id, assign_mandelbox.session_id, 'ALLOCATED');
        RETURN QUERY SELECT 'OK'::varchar, wanted_region::varchar,
          assign_mandelbox.new_mandelbox_id, chosen.id, chosen.ip_addr, chosen.tls_fingerprint,
          false;
        RETURN;
      END IF;
    END LOOP;

    mismatch := mismatch OR EXISTS (
      SELECT 1 FROM whist.instances AS h
      WHERE h.status = 'ACTIVE' AND h.provider = image.provider AND h.region = wanted_region
        AND h.image_id = image.image_id
        AND h.client_sha <> wanted
        AND (h.remaining_capacity > 0 OR EXISTS (
          SELECT 1 FROM whist.mandelboxes AS m
          WHERE m.instance_id = h.id AND m.status = 'WAITING' AND m.app = assign_mandelbox.app)));
  END LOOP;

  RETURN QUERY SELECT
    (CASE WHEN mismatch THEN 'COMMIT_HASH_MISMATCH' ELSE 'NO_INSTANCE_AVAILABLE' END)::varchar,
    NULL::varchar, NULL::uuid, NULL::varchar, NULL::inet, NULL::varchar, NULL::boolean;
END
$$;
