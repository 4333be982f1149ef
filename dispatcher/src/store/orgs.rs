//! Orgs, users and memberships. Roles live here, in Postgres, and are
//! checked on every user call: a valid token alone grants nothing.

use uuid::Uuid;

use super::Store;
use crate::domain::Role;
use crate::error::StoreError;

impl Store {
    /// Creates an org, or returns the id of the org that has this name.
    pub async fn ensure_org(&self, name: &str) -> Result<Uuid, StoreError> {
        let id = sqlx::query_scalar(
            "INSERT INTO orgs (id, name) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
             RETURNING id",
        )
        .bind(Uuid::now_v7())
        .bind(name)
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    /// Creates a user, or returns the id of the user with this e-mail.
    pub async fn ensure_user(&self, email: &str) -> Result<Uuid, StoreError> {
        let id = sqlx::query_scalar(
            "INSERT INTO users (id, email) VALUES ($1, $2)
             ON CONFLICT (email) DO UPDATE SET email = EXCLUDED.email
             RETURNING id",
        )
        .bind(Uuid::now_v7())
        .bind(email)
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
        sqlx::query(
            "INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, $3)
             ON CONFLICT (org_id, user_id) DO UPDATE SET role = EXCLUDED.role",
        )
        .bind(org_id)
        .bind(user_id)
        .bind(role.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes a membership; returns whether there was one.
    pub async fn remove_membership(&self, org_id: Uuid, user_id: Uuid) -> Result<bool, StoreError> {
        let n = sqlx::query("DELETE FROM memberships WHERE org_id = $1 AND user_id = $2")
            .bind(org_id)
            .bind(user_id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    /// The user's role in the org, if a member.
    pub async fn member_role(
        &self,
        org_id: Uuid,
        user_id: Uuid,
    ) -> Result<Option<Role>, StoreError> {
        let role: Option<String> =
            sqlx::query_scalar("SELECT role FROM memberships WHERE org_id = $1 AND user_id = $2")
                .bind(org_id)
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(role.as_deref().and_then(Role::parse))
    }
}
