-- Identity is never changed by an org-scoped call (ADR 0012, revised).
-- A membership an org admin adds is an invitation: it grants its role when
-- the user names the org (the Dispatcher-Org header, or the org of a
-- dispatcher-minted token), which accepts it, but it never becomes the
-- user's default org by itself. The default org of a call without the
-- header is the user's only *accepted* membership. Operator-made
-- memberships (the CLI, `dispatcher dev`) are accepted when made.
-- Expand-only: every existing membership counts as accepted.
ALTER TABLE memberships
    ADD COLUMN accepted_at timestamptz,
    ADD COLUMN invited_by uuid REFERENCES users (id) ON DELETE SET NULL;
UPDATE memberships SET accepted_at = created_at;
