-- Launches in flight: the scaling service writes a launch's record before it asks the cloud for
-- instances and deletes it once the instances' PRE_CONNECTION rows are inserted (or a failed
-- launch has been cleaned up). Every instance of a launch carries the launch id as a tag, and a
-- launch is idempotent per id, so a controller that starts (or takes the leader lease over)
-- resumes each record of its region: the repeated launch finds the instances a killed process
-- launched, and their rows are inserted instead of the instances being terminated as orphans.

CREATE TABLE whist.scaling_launches (
  launch_id     varchar     NOT NULL CONSTRAINT scaling_launches_pkey PRIMARY KEY
    CONSTRAINT scaling_launches_launch_id_check CHECK (launch_id <> ''),
  region        varchar     NOT NULL CONSTRAINT scaling_launches_region_check CHECK (region <> ''),
  image_id      varchar     NOT NULL
    CONSTRAINT scaling_launches_image_id_check CHECK (image_id <> ''),
  instance_type varchar     NOT NULL
    CONSTRAINT scaling_launches_instance_type_check CHECK (instance_type <> ''),
  count         integer     NOT NULL CONSTRAINT scaling_launches_count_check CHECK (count > 0),
  client_sha    varchar     NOT NULL,
  created_at    timestamptz NOT NULL DEFAULT now()
);

-- A controller loads its own region's records.
CREATE INDEX scaling_launches_region_idx ON whist.scaling_launches (region);
