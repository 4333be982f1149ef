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

    /// Grants `role` in `org_id` to `user_id`, replacing any earlier role.
    pub async fn set_membership(
        &self,
        org_id: Uuid,
        user_id: Uuid,
        role: Role,
    ) -> Result<(), StoreError> {
        sqlx::query!(
            "INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, $3)
             ON CONFLICT (org_id, user_id) DO UPDATE SET role = EXCLUDED.role",
            org_id,
            user_id,
            role.as_str(),
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

    /// The org's members: user id, e-mail, IdP subject, role; by e-mail.
    pub async fn list_members(
        &self,
        org_id: Uuid,
    ) -> Result<Vec<(Uuid, String, Option<String>, String)>, StoreError> {
        Ok(sqlx::query!(
            "SELECT u.id, u.email, u.idp_subject, m.role FROM memberships m
               JOIN users u ON u.id = m.user_id
              WHERE m.org_id = $1 ORDER BY u.email",
            org_id,
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| (r.id, r.email, r.idp_subject, r.role))
        .collect())
    }

    /// Links a user to its identity at the IdP (`issuer`, `subject`).
    pub async fn set_user_subject(
        &self,
        user_id: Uuid,
        issuer: &str,
        subject: &str,
    ) -> Result<(), StoreError> {
        let done = sqlx::query!(
            "UPDATE users SET idp_issuer = $2, idp_subject = $3 WHERE id = $1",
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
            Ok(_) => Ok(()),
        }
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

    /// The user's org when it belongs to exactly one.
    pub async fn sole_org(&self, user_id: Uuid) -> Result<Option<Uuid>, StoreError> {
        let orgs: Vec<Uuid> = sqlx::query_scalar!(
            "SELECT org_id FROM memberships WHERE user_id = $1 LIMIT 2",
            user_id,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(if orgs.len() == 1 { Some(orgs[0]) } else { None })
    }

    /// The user's role in the org, if a member.
    pub async fn member_role(
        &self,
        org_id: Uuid,
        user_id: Uuid,
    ) -> Result<Option<Role>, StoreError> {
        let role: Option<String> = sqlx::query_scalar!(
            "SELECT role FROM memberships WHERE org_id = $1 AND user_id = $2",
            org_id,
            user_id,
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(role.as_deref().and_then(Role::parse))
    }
}
