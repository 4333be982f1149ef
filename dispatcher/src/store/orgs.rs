//! Orgs, users and memberships. Roles live here, in Postgres, and are
//! checked on every user call: a valid token alone grants nothing.

use uuid::Uuid;

use super::Store;
use crate::domain::Role;
use crate::error::StoreError;

impl Store {
    /// Creates an org, or returns the id of the org that has this name.
    pub async fn ensure_org(&self, name: &str) -> Result<Uuid, StoreError> {
        let id = sqlx::query_scalar!(
            "INSERT INTO orgs (id, name) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
             RETURNING id",
            Uuid::now_v7(),
            name,
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    /// Creates an org with `admin` as its admin, in one transaction; a
    /// taken name is a conflict.
    pub async fn create_org(&self, name: &str, admin: Uuid) -> Result<Uuid, StoreError> {
        let mut tx = self.pool.begin().await?;
        let id: Option<Uuid> = sqlx::query_scalar!(
            "INSERT INTO orgs (id, name) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING RETURNING id",
            Uuid::now_v7(),
            name,
        )
        .fetch_optional(&mut *tx)
        .await?;
        let id = id.ok_or_else(|| StoreError::Conflict(format!("an org named {name:?} exists")))?;
        sqlx::query!(
            "INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, 'admin')",
            id,
            admin,
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Creates a user, or returns the id of the user with this e-mail.
    pub async fn ensure_user(&self, email: &str) -> Result<Uuid, StoreError> {
        let id = sqlx::query_scalar!(
            "INSERT INTO users (id, email) VALUES ($1, $2)
             ON CONFLICT (email) DO UPDATE SET email = EXCLUDED.email
             RETURNING id",
            Uuid::now_v7(),
            email,
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    /// Grants `role` in `org_id` to `user_id`, replacing any earlier role,
    /// as an accepted membership: the operator's way (the CLI, `dispatcher
    /// dev`). An org admin's way is [`Store::invite_member`].
    pub async fn set_membership(
        &self,
        org_id: Uuid,
        user_id: Uuid,
        role: Role,
    ) -> Result<(), StoreError> {
        sqlx::query!(
            "INSERT INTO memberships (org_id, user_id, role, accepted_at) VALUES ($1, $2, $3, now())
             ON CONFLICT (org_id, user_id) DO UPDATE
                SET role = EXCLUDED.role,
                    accepted_at = coalesce(memberships.accepted_at, EXCLUDED.accepted_at)",
            org_id,
            user_id,
            role.as_str(),
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// An org admin invites a user (ADR 0012): a membership with `role`
    /// that the user has not accepted yet. It grants the role once the user
    /// names the org, and is never the user's default org before. Nothing
    /// of the user's row changes. Returns false, changing nothing, when the
    /// user is a member already (the caller changes the role instead).
    pub async fn invite_member(
        &self,
        org_id: Uuid,
        user_id: Uuid,
        role: Role,
        invited_by: Uuid,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query!(
            "INSERT INTO memberships (org_id, user_id, role, invited_by) VALUES ($1, $2, $3, $4)
             ON CONFLICT (org_id, user_id) DO NOTHING",
            org_id,
            user_id,
            role.as_str(),
            invited_by,
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks the membership accepted (a no-op when it is).
    pub async fn accept_membership(&self, org_id: Uuid, user_id: Uuid) -> Result<(), StoreError> {
        sqlx::query!(
            "UPDATE memberships SET accepted_at = now()
              WHERE org_id = $1 AND user_id = $2 AND accepted_at IS NULL",
            org_id,
            user_id,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes a membership; returns whether there was one. The org's last
    /// admin (or owner) cannot be removed: a conflict, nothing changed.
    pub async fn remove_membership(&self, org_id: Uuid, user_id: Uuid) -> Result<bool, StoreError> {
        self.change_membership(org_id, user_id, None).await
    }

    /// Changes a member's role, keeping at least one admin (or owner) in
    /// the org; `None` removes the member. Concurrent changes of one org
    /// are serialised on its row, so two admins removing each other
    /// cannot leave it without one. Returns whether the user was a member.
    pub async fn change_membership(
        &self,
        org_id: Uuid,
        user_id: Uuid,
        role: Option<Role>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query!(
            "SELECT 1 AS locked FROM orgs WHERE id = $1 FOR UPDATE",
            org_id,
        )
        .fetch_optional(&mut *tx)
        .await?;
        let current: Option<String> = sqlx::query_scalar!(
            "SELECT role FROM memberships WHERE org_id = $1 AND user_id = $2",
            org_id,
            user_id,
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(current) = current.as_deref().and_then(Role::parse) else {
            return Ok(false);
        };
        let stays_admin = role.is_some_and(|r| r >= Role::Admin);
        if current >= Role::Admin && !stays_admin {
            let admins: i64 = sqlx::query_scalar!(
                r#"SELECT count(*) AS "n!" FROM memberships WHERE org_id = $1 AND role IN ('admin', 'owner')"#,
                org_id,
            )
            .fetch_one(&mut *tx)
            .await?;
            if admins <= 1 {
                return Err(StoreError::Conflict(
                    "the org's last admin cannot be removed or demoted; make another member admin first"
                        .into(),
                ));
            }
        }
        match role {
            Some(r) => {
                sqlx::query!(
                    "UPDATE memberships SET role = $3 WHERE org_id = $1 AND user_id = $2",
                    org_id,
                    user_id,
                    r.as_str(),
                )
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query!(
                    "DELETE FROM memberships WHERE org_id = $1 AND user_id = $2",
                    org_id,
                    user_id,
                )
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    /// The org's members: user id, e-mail, IdP subject, role, whether the
    /// user has accepted; by e-mail.
    pub async fn list_members(&self, org_id: Uuid) -> Result<Vec<MemberRow>, StoreError> {
        Ok(sqlx::query_as!(
            MemberRow,
            r#"SELECT u.id AS user_id, u.email, u.idp_subject, m.role,
                      m.accepted_at IS NOT NULL AS "accepted!"
                 FROM memberships m JOIN users u ON u.id = m.user_id
                WHERE m.org_id = $1 ORDER BY u.email"#,
            org_id,
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// One member of the org, as [`Store::list_members`] lists it.
    pub async fn member(
        &self,
        org_id: Uuid,
        user_id: Uuid,
    ) -> Result<Option<MemberRow>, StoreError> {
        Ok(sqlx::query_as!(
            MemberRow,
            r#"SELECT u.id AS user_id, u.email, u.idp_subject, m.role,
                      m.accepted_at IS NOT NULL AS "accepted!"
                 FROM memberships m JOIN users u ON u.id = m.user_id
                WHERE m.org_id = $1 AND m.user_id = $2"#,
            org_id,
            user_id,
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Links a user that has no identity yet to its identity at the IdP
    /// (`issuer`, `subject`): the operator's command. A user bound to
    /// another identity, or an identity bound to another user, is a
    /// conflict and nothing changes; binding the same pair again is a
    /// no-op. No org-scoped call reaches this (ADR 0012).
    pub async fn set_user_subject(
        &self,
        user_id: Uuid,
        issuer: &str,
        subject: &str,
    ) -> Result<(), StoreError> {
        let done = sqlx::query!(
            "UPDATE users SET idp_issuer = $2, idp_subject = $3
              WHERE id = $1
                AND (idp_subject IS NULL OR (idp_issuer = $2 AND idp_subject = $3))",
            user_id,
            issuer,
            subject,
        )
        .execute(&self.pool)
        .await;
        match done {
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => Err(
                StoreError::Conflict(format!("subject {subject:?} belongs to another user")),
            ),
            Err(e) => Err(e.into()),
            Ok(d) if d.rows_affected() == 0 => Err(StoreError::Conflict(format!(
                "user {user_id} does not exist or is bound to another identity"
            ))),
            Ok(_) => Ok(()),
        }
    }

    /// First sign-in (ADR 0012): binds an IdP identity that no user has to
    /// the one user whose e-mail (compared without case) is the token's
    /// verified e-mail, if that user has no identity yet. Returns the user,
    /// or `None` when there is no such user, several, or it is bound.
    pub async fn bind_identity_by_email(
        &self,
        issuer: &str,
        subject: &str,
        email: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        let bound = sqlx::query_scalar!(
            "WITH candidates AS (SELECT id, idp_subject FROM users WHERE lower(email) = lower($3))
             UPDATE users SET idp_issuer = $1, idp_subject = $2
              WHERE id = (SELECT id FROM candidates)
                AND idp_subject IS NULL
                AND (SELECT count(*) FROM candidates) = 1
             RETURNING id",
            issuer,
            subject,
            email,
        )
        .fetch_optional(&self.pool)
        .await;
        match bound {
            // The identity was bound to someone meanwhile: let the caller
            // look it up again.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
                self.user_by_subject(issuer, subject).await
            }
            Err(e) => Err(e.into()),
            Ok(id) => Ok(id),
        }
    }

    /// The operator's unbinding: the user with this e-mail keeps its
    /// memberships and loses its IdP identity. Returns the user, if one
    /// was bound.
    pub async fn unbind_identity(&self, email: &str) -> Result<Option<Uuid>, StoreError> {
        Ok(sqlx::query_scalar!(
            "UPDATE users SET idp_issuer = NULL, idp_subject = NULL
              WHERE email = $1 AND idp_subject IS NOT NULL RETURNING id",
            email,
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The user an IdP identity belongs to.
    pub async fn user_by_subject(
        &self,
        issuer: &str,
        subject: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        Ok(sqlx::query_scalar!(
            "SELECT id FROM users WHERE idp_issuer = $1 AND idp_subject = $2",
            issuer,
            subject,
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The user's default org: its only accepted membership. An invitation
    /// the user has not accepted never counts, so adding someone to an org
    /// does not change where that person's calls land.
    pub async fn sole_org(&self, user_id: Uuid) -> Result<Option<Uuid>, StoreError> {
        let orgs: Vec<Uuid> = sqlx::query_scalar!(
            "SELECT org_id FROM memberships
              WHERE user_id = $1 AND accepted_at IS NOT NULL LIMIT 2",
            user_id,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(if orgs.len() == 1 { Some(orgs[0]) } else { None })
    }

    /// The user's role in the org it names, if a member. Naming the org
    /// accepts an invitation to it (ADR 0012).
    pub async fn member_role(
        &self,
        org_id: Uuid,
        user_id: Uuid,
    ) -> Result<Option<Role>, StoreError> {
        let row = sqlx::query!(
            r#"SELECT role, accepted_at IS NOT NULL AS "accepted!" FROM memberships
                WHERE org_id = $1 AND user_id = $2"#,
            org_id,
            user_id,
        )
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        if !row.accepted {
            self.accept_membership(org_id, user_id).await?;
        }
        Ok(Role::parse(&row.role))
    }
}

/// A member of an org, as the org's members see it.
#[derive(Debug, Clone)]
pub struct MemberRow {
    pub user_id: Uuid,
    pub email: String,
    pub idp_subject: Option<String>,
    pub role: String,
    pub accepted: bool,
}
