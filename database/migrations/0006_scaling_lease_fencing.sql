-- Fencing for the scaling service's leader lease (issue #15). A leader that was paused past its
-- lease (a GC pause, a stopped VM, a partition) must not act once another replica has taken the
-- lease over, and expiry must not depend on any replica's clock.
--
-- - `generation` grows every time the lease changes hands (a fresh row, or a takeover): the
--   fencing token. A renewal by the holder keeps it.
-- - `ttl_ms`: the lease's length; `expires_at` is computed here, on the database's clock
--   (now() + ttl_ms), whatever the replica sent, and a takeover is refused while another
--   holder's lease is live by that clock.
-- - `scaling_fences`: every controller write is sent in one request (one transaction) with an
--   upsert of (lease name, the writer's generation) into this table, whose foreign key names
--   the lease's current (name, generation). A stale generation violates the key and rolls the
--   whole request back, so no write of an old leader lands after a takeover. ON UPDATE CASCADE
--   keeps one row per lease (it follows the generation), so the table never grows.

CREATE SEQUENCE whist.scaling_lease_generation;

ALTER TABLE whist.scaling_leases
  ADD COLUMN generation bigint NOT NULL DEFAULT nextval('whist.scaling_lease_generation'),
  ADD COLUMN ttl_ms integer NOT NULL DEFAULT 15000
    CONSTRAINT scaling_leases_ttl_ms_check CHECK (ttl_ms > 0),
  ALTER COLUMN expires_at SET DEFAULT now(),
  ADD CONSTRAINT scaling_leases_name_generation_key UNIQUE (name, generation);

CREATE FUNCTION whist.scaling_leases_on_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'UPDATE' AND NEW.holder IS DISTINCT FROM OLD.holder THEN
    IF OLD.expires_at >= now() THEN
      -- Another holder's live lease: not taken over (the upsert returns no row).
      RETURN NULL;
    END IF;
    NEW.generation := nextval('whist.scaling_lease_generation');
  ELSIF TG_OP = 'UPDATE' THEN
    NEW.generation := OLD.generation;
  END IF;
  NEW.expires_at := now() + make_interval(secs => NEW.ttl_ms / 1000.0);
  NEW.updated_at := now();
  RETURN NEW;
END;
$$;

CREATE TRIGGER scaling_leases_on_write
  BEFORE INSERT OR UPDATE ON whist.scaling_leases
  FOR EACH ROW EXECUTE FUNCTION whist.scaling_leases_on_write();

CREATE TABLE whist.scaling_fences (
  name       varchar NOT NULL,
  generation bigint  NOT NULL,
  CONSTRAINT scaling_fences_pkey PRIMARY KEY (name),
  -- A stale writer's upsert sets its generation here, and the key refuses it.
  CONSTRAINT scaling_fences_lease_fkey FOREIGN KEY (name, generation)
    REFERENCES whist.scaling_leases (name, generation) ON UPDATE CASCADE ON DELETE CASCADE
);
