// OHIF's configuration for the compose demo (deploy/compose.yaml, service ohif): one DICOMweb data
// source, Orthanc, on this page's own origin (nginx.conf proxies /dicom-web/ to it). It is the
// configuration CI's viewer test (tests/viewer/ohif.py) runs OHIF 3.12.10 with; a deploy test
// fails when the two differ in more than the source's friendlyName. window.config stays plain
// JSON so that the test can read it.
window.config = {
  "routerBasename": "/",
  "extensions": [],
  "modes": [],
  "showStudyList": true,
  "maxNumberOfWebWorkers": 2,
  "showWarningMessageForCrossOrigin": false,
  "showCPUFallbackMessage": false,
  "showLoadingIndicator": true,
  "strictZSpacingForVolumeViewport": true,
  "investigationalUseDialog": {
    "option": "never"
  },
  "disableConfirmationPrompts": true,
  "defaultDataSourceName": "mammonode",
  "dataSources": [
    {
      "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
      "sourceName": "mammonode",
      "configuration": {
        "friendlyName": "MammoNode demo PACS (Orthanc)",
        "name": "orthanc",
        "qidoSupportsIncludeField": true,
        "supportsReject": false,
        "dicomUploadEnabled": false,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": true,
        "supportsFuzzyMatching": false,
        "supportsWildcard": true,
        "omitQuotationForMultipartRequest": true,
        "bulkDataURI": {
          "enabled": true
        }
      }
    }
  ]
};
window.config.dataSources[0].configuration.wadoUriRoot = window.location.origin + '/dicom-web';
window.config.dataSources[0].configuration.qidoRoot = window.location.origin + '/dicom-web';
window.config.dataSources[0].configuration.wadoRoot = window.location.origin + '/dicom-web';
window.config.httpErrorHandler = error => {
  console.error('OHIF HTTP error', error && error.status, error && error.url);
};
