-- Users from an identity provider (ADR 0012): a user may be known by the
-- IdP's issuer and subject. The token names the user; memberships and
-- roles stay here. Expand-only.
ALTER TABLE users
    ADD COLUMN idp_issuer text,
    ADD COLUMN idp_subject text,
    ADD CONSTRAINT users_idp_pair CHECK ((idp_issuer IS NULL) = (idp_subject IS NULL)),
    ADD CONSTRAINT users_idp_subject_key UNIQUE (idp_issuer, idp_subject);
