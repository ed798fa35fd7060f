//! Operations on `whist.images` (documents in `graphql/images.graphql`).

use graphql_client::GraphQLQuery;

use crate::client::DbClient;
use crate::error::DbError;
use crate::instances::required;
use crate::types::{Image, Region};

// rustfmt re-indents attributes inside macro_rules on every run.
#[rustfmt::skip]
macro_rules! image_operation {
    ($name:ident, $response:tt) => {
        #[derive(GraphQLQuery, Debug)]
        #[graphql(
            schema_path = "../schema.graphql",
            query_path = "graphql/images.graphql",
            custom_scalars_module = "crate::graphql",
            response_type = $response,
            response_derives = "Debug",
            variables_derives = "Debug"
        )]
        pub struct $name;
    };
}

image_operation!(LatestImage, "crate::graphql::ImageRow");
image_operation!(Images, "crate::graphql::ImageRow");
image_operation!(UpsertImage, "crate::graphql::ImageRow");

impl DbClient {
    /// The current image for `provider` (e.g. `AWS`) in `region`, `None` if there is none.
    pub async fn latest_image(
        &self,
        provider: &str,
        region: &Region,
    ) -> Result<Option<Image>, DbError> {
        let variables = latest_image::Variables {
            provider: provider.to_owned(),
            region: region.to_string(),
        };
        Ok(self
            .execute::<LatestImage>(variables)
            .await?
            .whist_images_by_pk)
    }

    /// Every image row, by provider and region.
    pub async fn images(&self) -> Result<Vec<Image>, DbError> {
        Ok(self
            .execute::<Images>(images::Variables)
            .await?
            .whist_images)
    }

    /// Inserts the image for its provider and region, or replaces `image_id`, `client_sha` and
    /// `updated_at` of the existing one. Returns the row as stored: a new row keeps
    /// `image.updated_at`; a replaced one gets the database's clock from the row trigger.
    pub async fn upsert_image(&self, image: &Image) -> Result<Image, DbError> {
        let variables = upsert_image::Variables {
            provider: image.provider.clone(),
            region: image.region.to_string(),
            image_id: image.image_id.to_string(),
            client_sha: image.client_sha.clone(),
            updated_at: image.updated_at,
        };
        let response = self.execute::<UpsertImage>(variables).await?;
        required("UpsertImage", response.insert_whist_images_one)
    }
}
