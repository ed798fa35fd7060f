-- Host attestation (issue #14, docs/operations.md "Host attestation"): trust on first use. A host
-- proves it is an EC2 instance of this deployment with its signed instance identity document and
-- gets a short-lived credential for Hasura. This table records, per instance, the newest
-- credential handed out: its JWT id and expiry. While it is live, a second attestation for the
-- instance is refused unless it presents that very credential (a renewal), so a replayed
-- identity document gets nothing. Only the attestation endpoint (admin) reads or writes it.

CREATE TABLE whist.host_attestations (
  instance_id varchar     NOT NULL CONSTRAINT host_attestations_pkey PRIMARY KEY
                          CONSTRAINT host_attestations_instance_id_check CHECK (instance_id <> ''),
  token_id    uuid        NOT NULL,
  expires_at  timestamptz NOT NULL,
  attested_at timestamptz NOT NULL DEFAULT now()
);
