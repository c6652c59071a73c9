//! The conformance suite against an SQS/SNS server (`scripts/local-brokers.sh sqs` starts
//! LocalStack on 127.0.0.1:4566), in fan-out mode and in queue mode, each on standard and on
//! FIFO queues (FIFO claims per-key order, so the order scenarios run there).
//! `BUSBAR_SQS_URL` overrides the fan-out URL.

use std::sync::Arc;

use busbar_core::Transport;
use busbar_sqs::SqsTransport;

const LOCAL: &str = "sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test&wait_time_s=1&visibility_timeout_s=10";

/// The fan-out URL under test.
pub fn url() -> String {
    std::env::var("BUSBAR_SQS_URL").unwrap_or_else(|_| LOCAL.to_string())
}

mod fanout {
    use super::*;

    async fn sqs() -> busbar_core::Result<Arc<dyn Transport>> {
        Ok(Arc::new(SqsTransport::connect(&url().parse()?).await?))
    }

    busbar_testkit::conformance_suite!(sqs);
}

mod queue {
    use super::*;

    async fn sqs() -> busbar_core::Result<Arc<dyn Transport>> {
        Ok(Arc::new(
            SqsTransport::connect(&format!("{}&mode=queue", url()).parse()?).await?,
        ))
    }

    busbar_testkit::conformance_suite!(sqs);
}

mod fifo_fanout {
    use super::*;

    async fn sqs() -> busbar_core::Result<Arc<dyn Transport>> {
        Ok(Arc::new(
            SqsTransport::connect(&format!("{}&fifo=true", url()).parse()?).await?,
        ))
    }

    busbar_testkit::conformance_suite!(sqs);
}

mod fifo_queue {
    use super::*;

    async fn sqs() -> busbar_core::Result<Arc<dyn Transport>> {
        Ok(Arc::new(
            SqsTransport::connect(&format!("{}&mode=queue&fifo=true", url()).parse()?).await?,
        ))
    }

    busbar_testkit::conformance_suite!(sqs);
}
