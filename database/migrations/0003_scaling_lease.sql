-- Leader election for the scaling service: replicas may run side by side, and only the holder
-- of a live lease acts. A replica takes the lease when nobody holds it, renews it while it
-- holds it, and takes it over once it has expired (the holder died or hung). Acquire and renew
-- are one guarded upsert (see dbclient's leases.graphql): the update applies only when the row
-- is ours or expired, so two replicas never both hold it.

CREATE TABLE whist.scaling_leases (
  name       varchar     PRIMARY KEY,
  holder     varchar     NOT NULL,
  expires_at timestamptz NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now()
);
