-- The SHA-256 fingerprint of the certificate each host's json_transport endpoint presents
-- (a new self-signed certificate at every start of the host service): 64 lowercase hex digits
-- of the digest of its DER encoding. The host sets it right after registering, so the scaling
-- service, which forwards clients' json_transport requests to https://<ip_addr>:4678, can pin
-- the certificate instead of turning verification off. NULL until the host has published it
-- (a row the host has not registered yet, or a host from before this column).

ALTER TABLE whist.instances
  ADD COLUMN tls_fingerprint varchar
    CONSTRAINT instances_tls_fingerprint_check CHECK (tls_fingerprint ~ '^[0-9a-f]{64}$');
