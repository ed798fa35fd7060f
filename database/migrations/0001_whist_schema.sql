-- The `whist` schema: EC2 hosts (instances), the mandelboxes on them, and the
-- current host image per provider and region. Hasura tracks these three tables
-- (database/hasura/metadata.json); both services reach them only through Hasura.
--
-- Differences from the original schema (docs/database.md):
--   * mandelboxes.id is uuid (was varchar holding UUID text);
--   * mandelboxes.instance_id cascades on delete (RESTRICT made host shutdown fail);
--   * statuses are constrained to the known values; capacity cannot go negative;
--   * mandelboxes has updated_at, kept by a trigger like the other tables;
--   * indexes for the lookups the services make.

CREATE SCHEMA IF NOT EXISTS whist;

CREATE FUNCTION whist.set_current_timestamp_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  NEW.updated_at := now();
  RETURN NEW;
END
$$;

CREATE TABLE whist.images (
  provider   varchar     NOT NULL CONSTRAINT images_provider_check CHECK (provider <> ''),
  region     varchar     NOT NULL CONSTRAINT images_region_check CHECK (region <> ''),
  image_id   varchar     NOT NULL,
  client_sha varchar     NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT images_pkey PRIMARY KEY (provider, region)
);

CREATE TABLE whist.instances (
  id                 varchar     NOT NULL CONSTRAINT instances_pkey PRIMARY KEY,
  provider           varchar     NOT NULL,
  region             varchar     NOT NULL,
  image_id           varchar     NOT NULL,
  client_sha         varchar     NOT NULL,
  ip_addr            inet,
  instance_type      varchar     NOT NULL,
  remaining_capacity integer     NOT NULL
    CONSTRAINT instances_remaining_capacity_check CHECK (remaining_capacity >= 0),
  status             varchar     NOT NULL
    CONSTRAINT instances_status_check CHECK (status IN ('PRE_CONNECTION', 'ACTIVE', 'DRAINING')),
  created_at         timestamptz NOT NULL DEFAULT now(),
  updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE whist.mandelboxes (
  id          uuid        NOT NULL CONSTRAINT mandelboxes_pkey PRIMARY KEY,
  app         varchar     NOT NULL,
  instance_id varchar     NOT NULL
    CONSTRAINT mandelboxes_instance_id_fkey REFERENCES whist.instances (id)
    ON UPDATE CASCADE ON DELETE CASCADE,
  user_id     varchar,
  session_id  varchar,
  status      varchar     NOT NULL
    CONSTRAINT mandelboxes_status_check
    CHECK (status IN ('WAITING', 'ALLOCATED', 'CONNECTING', 'RUNNING', 'DYING')),
  created_at  timestamptz NOT NULL DEFAULT now(),
  updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The host's subscription (its ALLOCATED mandelboxes) and its reconcile pass.
CREATE INDEX mandelboxes_instance_id_status_idx ON whist.mandelboxes (instance_id, status);
-- The per-user limit on assignment.
CREATE INDEX mandelboxes_user_id_idx ON whist.mandelboxes (user_id);
-- The scaling service's per-region views (capacity, scale-down, assignment).
CREATE INDEX instances_region_status_idx ON whist.instances (region, status);
-- Image upgrades look up the hosts still on an old image.
CREATE INDEX instances_image_id_idx ON whist.instances (image_id);

CREATE TRIGGER set_whist_images_updated_at BEFORE UPDATE ON whist.images
  FOR EACH ROW EXECUTE FUNCTION whist.set_current_timestamp_updated_at();
CREATE TRIGGER set_whist_instances_updated_at BEFORE UPDATE ON whist.instances
  FOR EACH ROW EXECUTE FUNCTION whist.set_current_timestamp_updated_at();
CREATE TRIGGER set_whist_mandelboxes_updated_at BEFORE UPDATE ON whist.mandelboxes
  FOR EACH ROW EXECUTE FUNCTION whist.set_current_timestamp_updated_at();
